"""The curation pipeline: image cache -> splits -> ingest -> validate -> quality -> embed -> dedup
-> sample -> outputs."""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from dinoflow.pipelines.curation import nodes

_CURATION = "params:curation"


def create_pipeline(**kwargs) -> Pipeline:
    """Outputs for the catalog: ``curated_manifest``, ``quarantine``, ``curation_report``."""
    return Pipeline([
        Node(nodes.build_image_cache, "params:data", "image_cache_report", name="build_image_cache"),
        Node(nodes.load_curation_splits, ["params:data", "image_cache_report"], "curation_splits",
             name="curation_splits"),
        Node(nodes.ingest_images, ["curation_splits", _CURATION],
             ["curation_metadata_raw", "curation_thumbnails"], name="curation_ingest"),
        Node(nodes.validate_images, ["curation_metadata_raw", "curation_splits", _CURATION],
             "curation_validation", name="curation_validate"),
        Node(nodes.filter_quality, ["curation_metadata_raw", "curation_validation", _CURATION],
             "curation_metadata_quality", name="curation_quality"),
        Node(nodes.embed_images, ["curation_metadata_quality", "curation_thumbnails",
                                  "curation_splits", _CURATION],
             ["curation_embeddings", "curation_embed_timing"], name="curation_embed"),
        Node(nodes.deduplicate_images, ["curation_metadata_quality", "curation_embeddings", _CURATION],
             "curation_metadata_dedup", name="curation_deduplicate"),
        Node(nodes.sample_balanced, ["curation_metadata_dedup", "curation_embeddings", _CURATION],
             ["curation_metadata", "curation_balance"], name="curation_sample"),
        Node(nodes.write_outputs, ["curation_metadata", "curation_validation", "curation_balance",
                                   "curation_splits", "curation_embed_timing", _CURATION],
             ["curated_manifest", "quarantine", "curation_report"], name="curation_outputs"),
    ])  # fmt: skip
