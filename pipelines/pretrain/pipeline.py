from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.pretrain.nodes import pretrain


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                pretrain,
                inputs=["params:data", "params:pretrain", "curated_manifest"],
                outputs="pretrain_summary",
                name="pretrain",
            )
        ]
    )
