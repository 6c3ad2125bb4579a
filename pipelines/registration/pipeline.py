from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.registration.nodes import register_backbone


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                register_backbone,
                inputs=["pretrain_summary", "evaluation", "params:registration", "params:data"],
                outputs="registration_summary",
                name="register_backbone",
            )
        ]
    )
