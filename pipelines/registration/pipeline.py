from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.registration.nodes import register_backbone


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                register_backbone,
                inputs=["pretrain_summary", "teacher_backbone", "metrics", "evaluation_report",
                        "params:registration", "params:data"],
                outputs="registration_summary",
                name="register_backbone",
            )
        ]
    )
