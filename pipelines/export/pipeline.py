from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.export.nodes import export_model


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [Node(export_model, inputs="params:export", outputs="export_summary", name="export_model")]
    )
