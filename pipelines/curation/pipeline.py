"""The curation pipeline: ingest -> validate -> quality -> embed -> dedup -> sample -> outputs."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.curation import nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Outputs for the catalog: ``curated_manifest``, ``quarantine``, ``curation_report``."""
    return Pipeline(
        [
            Node(
                nodes.ingest_images,
                ["params:data", "params:curation"],
                ["curation_metadata_raw", "curation_thumbnails"],
                name="curation_ingest",
            ),
            Node(
                nodes.validate_images,
                ["curation_metadata_raw", "params:data", "params:curation"],
                "curation_validation",
                name="curation_validate",
            ),
            Node(
                nodes.filter_quality,
                ["curation_metadata_raw", "curation_validation", "params:curation"],
                "curation_metadata_quality",
                name="curation_quality",
            ),
            Node(
                nodes.embed_images,
                ["curation_metadata_quality", "curation_thumbnails", "params:data", "params:curation"],
                "curation_embeddings",
                name="curation_embed",
            ),
            Node(
                nodes.deduplicate_images,
                ["curation_metadata_quality", "curation_embeddings", "params:curation"],
                "curation_metadata_dedup",
                name="curation_deduplicate",
            ),
            Node(
                nodes.sample_balanced,
                ["curation_metadata_dedup", "curation_embeddings", "params:curation"],
                ["curation_metadata", "curation_balance"],
                name="curation_sample",
            ),
            Node(
                nodes.write_outputs,
                ["curation_metadata", "curation_validation", "curation_balance", "params:data", "params:curation"],
                ["curated_manifest", "quarantine", "curation_report"],
                name="curation_outputs",
            ),
        ]
    )
