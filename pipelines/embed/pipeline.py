from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.embed.nodes import embed_images


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                embed_images,
                inputs=["params:data", "params:embed", "curated_manifest"],
                outputs="embed_summary",
                name="embed_images",
            )
        ]
    )
