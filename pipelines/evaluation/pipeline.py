from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.evaluation.nodes import evaluate


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                evaluate,
                inputs=["params:data", "params:evaluation", "pretrain_summary"],
                outputs="evaluation",
                name="evaluate",
            )
        ]
    )
