from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.distillation.nodes import distill, evaluate_distilled, register_distilled


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                distill,
                inputs=["params:data", "params:distillation", "curated_manifest"],
                outputs="distillation_summary",
                name="distill",
            ),
            Node(
                evaluate_distilled,
                inputs=["params:data", "params:evaluation", "params:distillation",
                        "distillation_summary"],
                outputs="distillation_evaluation",
                name="evaluate_distilled",
            ),
            Node(
                register_distilled,
                inputs=["distillation_summary", "distillation_evaluation",
                        "params:distillation_registration"],
                outputs="distillation_registration_summary",
                name="register_distilled",
            ),
        ]
    )
