"""Validated parameters of the curation pipeline (``params:curation``).

Every model forbids unknown keys: a typo is one error naming ``curation.<section>.<key>``.
Reference values (DINOv2, Oquab et al. 2023, appendix A; Vo et al. 2024) are noted where the CPU
default differs. The DINOv2 thresholds (0.6 self-dedup, 0.45 eval decontamination) hold for SSCD
copy-detection descriptors; the defaults here are calibrated for the downsampled-pixel + PCA
embedder on Fashion-MNIST (cosine > 0.998 is the same photo; 0.99 is already a different item).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from dinoflow.config import Strict as _Strict
from dinoflow.config import validate


class IngestConfig(_Strict):
    """Decoding guard and what ingest records."""

    # Pillow's decompression-bomb guard: headers announcing more pixels are never decoded.
    max_pixels: int = Field(40_000_000, gt=0)
    compute_phash: bool = True
    # Reduced decoding: a JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, as small as keeps
    # its shorter side >= this (``dinoflow.data.decode``); None: every file in full. The table's
    # width/height stay the file's full size; sha256, pHash, std/entropy and the thumbnails come
    # from the reduced decode (docs/architecture.md, "Curation ingest at scale").
    decode_min_side: int | None = Field(256, ge=1)
    # Items per chunk: the unit of work of a worker process and of resuming a killed run
    # (``dinoflow.curation.ingest_run``). Files: about 256 x 50 ms for camera photos.
    files_per_chunk: int = Field(256, ge=1)
    arrays_per_chunk: int = Field(4096, ge=1)  # in-memory images (Fashion-MNIST)


class ValidationConfig(_Strict):
    """The Great Expectations suite on the ingested metadata."""

    enabled: bool = True
    # Must hold (stops the run): ids unique and non-null, labels in the known set, and at least
    # this fraction of the files readable. The per-file checks below only warn (quality filters
    # remove the offenders with a reason).
    min_readable_fraction: float = Field(0.5, ge=0, le=1)
    allowed_channels: list[int] = [1, 2, 3, 4]
    docs_dir: str = "data/08_reporting/curation/gx_docs"
    # Rows per GX run of the row-wise expectations: bounds GX's memory and paces the progress bar.
    rows_per_batch: int = Field(250_000, ge=1)


class QualityConfig(_Strict):
    """Per-image filters, each with its own quarantine reason."""

    min_side: int = Field(16, ge=1)  # reason too_small
    max_aspect: float = Field(5.0, gt=1)  # reason extreme_aspect (long side / short side)
    min_std: float = Field(3.0, ge=0)  # reason low_information: grey-level std (0..255)
    min_entropy_bits: float = Field(0.5, ge=0)  # reason low_information: grey histogram entropy
    max_pixels: int = Field(40_000_000, gt=0)  # reason too_large (also the decoding guard)


class DedupConfig(_Strict):
    """Exact (pixel sha256) and near (perceptual hash, embedding cosine) duplicates in the pool."""

    exact: bool = True
    phash: bool = True
    phash_max_distance: int = Field(4, ge=0, le=64)  # Hamming distance of the 64-bit pHash
    # Below this side the 32x32 DCT of pHash sees upsampled pixels and unrelated images collide
    # (Fashion-MNIST 28x28: 622 train pairs at distance 0 and no exact duplicate at all).
    phash_min_side: int = Field(64, ge=1)
    embedding: bool = True
    cosine_threshold: float = Field(0.998, gt=-1, le=1)  # reference 0.6 (SSCD)
    k_neighbors: int = Field(16, ge=1)  # neighbours searched per image (reference 64)
    index: Literal["auto", "flat", "ivf"] = "auto"
    flat_max: int = Field(200_000, ge=1)  # "auto": exact search up to this many vectors
    ivf_nlist: int = Field(0, ge=0)  # 0: about 4 * sqrt(n)
    ivf_nprobe: int = Field(8, ge=1)
    query_batch: int = Field(16384, ge=1)


class DecontamConfig(_Strict):
    """Removal of pool images too close to a val/test image, with their whole component."""

    enabled: bool = True
    cosine_threshold: float = Field(0.995, gt=-1, le=1)  # stricter than dedup; reference 0.45
    phash_max_distance: int = Field(6, ge=0, le=64)
    exact: bool = True
    remove_component: bool = True


class EmbeddingConfig(_Strict):
    """How images become vectors for near-dedup, decontamination and clustering."""

    kind: Literal["pixels", "dinoflow", "timm"] = "pixels"
    pixel_size: int = Field(16, ge=2)  # pixels: RGB thumbnail side
    pca_dim: int = Field(64, ge=1)  # pixels: PCA components (fit on the pool)
    pca_max_fit: int = Field(100_000, ge=10)
    checkpoint: str | None = None  # dinoflow: a save_backbone file
    model_uri: str | None = None  # dinoflow: e.g. models:/dinoflow-backbone@champion
    timm_name: str | None = None  # timm: architecture name
    timm_weights: str | None = None  # timm: local weights file (never downloaded)
    timm_kwargs: dict = {}
    image_size: int = Field(224, ge=8)  # model embedders: input side
    mean: list[float] | None = None  # model embedders: None = ImageNet (timm: its data config)
    std: list[float] | None = None
    batch_size: int = Field(64, ge=1)
    # model embedders: rows per chunk on disk (``<work_dir>/embed/``), the unit of resuming a
    # killed run and of sharing the work among the ranks of a job (dinoflow.curation.embed_run)
    rows_per_chunk: int = Field(4096, ge=1)
    device: str = "auto"  # auto: CUDA when present (the training device), else the CPU
    # auto: the rule training and evaluation use (dinoflow.precision) for a batch's shapes
    precision: Literal["auto", "fp32", "bf16"] = "auto"

    @model_validator(mode="after")
    def _check_kind(self) -> EmbeddingConfig:
        if self.kind == "dinoflow" and not (self.checkpoint or self.model_uri):
            raise ValueError("kind=dinoflow needs embedding.checkpoint or embedding.model_uri")
        if self.kind == "timm" and not (self.timm_name and self.timm_weights):
            raise ValueError("kind=timm needs embedding.timm_name and embedding.timm_weights")
        return self


class SamplingConfig(_Strict):
    """Hierarchical k-means with resampling and top-down balanced sampling (Vo et al., 2024)."""

    enabled: bool = True
    target_size: int = Field(50_000, ge=1)
    n_clusters: list[int] = [500, 50]  # per level, finest first
    resampling_steps: list[int] = [0, 10]  # per level; reference [1, 10, 10, 10] (level 1 none)
    resample_sizes: list[int] = [0, 0]  # points per cluster per step; 0 = half the mean size
    strategy: Literal["random", "closest"] = "random"  # how a finest cluster gives its quota
    kmeans_iters: int = Field(25, ge=1)  # reference 50
    kmeans_init: Literal["kmeans++", "random"] = "kmeans++"
    max_points_per_centroid: int = Field(256, ge=1)  # k-means trains on a subsample beyond
    seed: int = 0

    @model_validator(mode="after")
    def _same_levels(self) -> SamplingConfig:
        n = len(self.n_clusters)
        if n == 0 or len(self.resampling_steps) != n or len(self.resample_sizes) != n:
            raise ValueError(
                "n_clusters, resampling_steps and resample_sizes need one entry per level "
                f"(got {len(self.n_clusters)}, {len(self.resampling_steps)}, "
                f"{len(self.resample_sizes)})"
            )
        if any(k < 1 for k in self.n_clusters):
            raise ValueError("n_clusters entries must be >= 1")
        return self


class ReportConfig(_Strict):
    """Where the report goes and how much of it is drawn."""

    dir: str = "data/08_reporting/curation"
    max_components_shown: int = Field(8, ge=0)
    max_images_per_component: int = Field(6, ge=2)


class CurationConfig(_Strict):
    """``params:curation``."""

    ingest: IngestConfig = IngestConfig()
    validation: ValidationConfig = ValidationConfig()
    quality: QualityConfig = QualityConfig()
    dedup: DedupConfig = DedupConfig()
    decontam: DecontamConfig = DecontamConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    sampling: SamplingConfig = SamplingConfig()
    report: ReportConfig = ReportConfig()
    show_progress: bool = True
    # Ingest worker processes; auto: the cores this process may use (os.sched_getaffinity).
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    # The ingest's chunks and thumbnails.npy (scratch and resume state, not a catalog output);
    # None: a temporary folder, removed after the run (no resume, thumbnails in memory).
    work_dir: str | None = None


def curation_config(params: dict | CurationConfig | None) -> CurationConfig:
    """Validate ``params:curation`` (raises ``dinoflow.config.ConfigError`` naming the key)."""
    if isinstance(params, CurationConfig):
        return params
    return validate(CurationConfig, params, "curation")  # type: ignore[return-value]
