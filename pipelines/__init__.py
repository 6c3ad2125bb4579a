"""dinoflow's Kedro pipelines (importable as ``dinoflow.pipelines``): thin wrappers over the library.

Each folder is one pipeline with ``create_pipeline()``; Kedro's ``find_pipelines`` finds them:
curation, pretrain, evaluation, registration, tuning (Optuna), export (the champion as ONNX and
timm weights), embed (batch embeddings + faiss index). ``__default__`` is DEFAULT_PIPELINES.
"""

from __future__ import annotations

DEFAULT_PIPELINES = ("curation", "pretrain", "evaluation", "registration")


def register_pipelines():
    from kedro.framework.project import find_pipelines
    from kedro.pipeline import Pipeline

    pipelines: dict[str, Pipeline] = find_pipelines(raise_errors=True)
    pipelines["__default__"] = sum(
        (pipelines[name] for name in DEFAULT_PIPELINES if name in pipelines), Pipeline([])
    )
    return pipelines
