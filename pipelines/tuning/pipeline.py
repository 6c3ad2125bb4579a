from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.tuning.nodes import tune


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                tune,
                inputs=["params:data", "params:pretrain", "params:tuning", "curated_manifest"],
                outputs="tuning_summary",
                name="tune",
            )
        ]
    )
