"""Embed: a folder (or the curated set) -> embeddings.parquet, a faiss index, a neighbours picture."""

from dinoflow.pipelines.embed.pipeline import create_pipeline

__all__ = ["create_pipeline"]
