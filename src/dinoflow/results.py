"""What each job hands to the next, typed: every reader validates the same model.

They travel as JSON files between Kedro nodes and DVC stages (``pretrain_summary.json``,
``evaluation_report.json``, ``registration.json``) and as Python objects inside a job. Unknown
keys are kept (``extra="allow"``) so a file written by a newer dinoflow still loads.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(extra="allow")

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class PretrainSummary(Result):
    """The pretrain job's result: where the model is, how it was trained, how fast."""

    run_dir: str
    teacher_backbone: str  # save_backbone file
    teacher_heads: str
    steps: int
    resumed_from_step: int = 0
    final: dict[str, float] = Field(default_factory=dict)  # the last logged metrics
    knn_history: list[dict[str, float]] = Field(default_factory=list)
    images_per_second: float = 0.0
    notes: list[str] = Field(default_factory=list)
    fingerprint: str = ""
    mean: list[float] = Field(default_factory=list)  # the normalisation it trained with
    std: list[float] = Field(default_factory=list)
    channels: int = 1
    image_size: int = 224  # the global crop size
    world_size: int = 1
    precision: str = "fp32"
    n_train_images: int | None = None
    data: dict[str, Any] | None = None
    mlflow_run_id: str | None = None
    # train files unreadable at training time, each replaced by another image of the split
    n_unreadable_files: int = 0
    unreadable_files: list[str] = Field(default_factory=list)
    # train.time_budget_min: the length it chose, and the --params of the same fixed-length run
    budget_steps: int | None = None
    budget_replay: str | None = None


class EvaluationReport(Result):
    """The evaluation job's result beside metrics.json: provenance, data identity, files."""

    model: str
    pretrain_run_id: str | None = None
    eval_data_id: str
    val_data_id: str | None = None
    data: dict[str, Any] | None = None
    files: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    labelled: bool = True
    precision: str = "fp32"  # the backbone's forward (evaluation.precision, resolved)
    # the images the metrics saw: the image_size centre crop at crop_ratio (None: not recorded)
    image_size: int | None = None
    crop_ratio: float | None = None
    mlflow_run_id: str | None = None


class RegistrationDecision(Result):
    """The registration job's result: the version, its alias and why."""

    model_name: str
    version: str
    alias: str
    promoted: bool
    metric_name: str = "knn_top1"
    metric_why: str = ""  # why this metric decides (registration.metric auto: labels or not)
    metric: float
    champion_metric: float | None = None
    champion_version: str | None = None
    eval_data_id: str | None = None
    champion_eval_data_id: str | None = None
    reason: str
    model_uri: str = ""
    lineage: dict[str, Any] = Field(default_factory=dict)


class DistillationSummary(Result):
    """The distillation job's result: the student (its EMA, the final model), its teacher, the
    FLOPs of both, how it was trained and how fast."""

    run_dir: str
    student_backbone: str  # save_backbone file of the student's EMA
    student_heads: str
    teacher: dict[str, Any] = Field(default_factory=dict)  # source, uri, model name/version, run
    mode: str = "heads"  # heads: DINO + iBOT on the teacher's heads; features: feature regression
    steps: int
    resumed_from_step: int = 0
    final: dict[str, float] = Field(default_factory=dict)
    knn_history: list[dict[str, float]] = Field(default_factory=list)
    images_per_second: float = 0.0
    train_seconds: float = 0.0  # the training loop of this process (a resumed run: since resuming)
    budget_steps: int | None = None  # train.time_budget_min: as PretrainSummary's
    budget_replay: str | None = None
    student_flops: int = 0  # one forward of one image at image_size (torch.utils.flop_counter)
    teacher_flops: int = 0
    notes: list[str] = Field(default_factory=list)
    fingerprint: str = ""
    mean: list[float] = Field(default_factory=list)
    std: list[float] = Field(default_factory=list)
    channels: int = 1
    image_size: int = 224
    world_size: int = 1
    precision: str = "fp32"
    n_train_images: int | None = None
    data: dict[str, Any] | None = None
    mlflow_run_id: str | None = None

    def as_pretrain_summary(self) -> PretrainSummary:
        """The student as a pretraining result: what evaluation and registration read."""
        return PretrainSummary(
            run_dir=self.run_dir,
            teacher_backbone=self.student_backbone,
            teacher_heads=self.student_heads,
            steps=self.steps,
            resumed_from_step=self.resumed_from_step,
            final=self.final,
            knn_history=self.knn_history,
            images_per_second=self.images_per_second,
            notes=self.notes,
            fingerprint=self.fingerprint,
            mean=self.mean,
            std=self.std,
            channels=self.channels,
            image_size=self.image_size,
            world_size=self.world_size,
            precision=self.precision,
            n_train_images=self.n_train_images,
            data=self.data,
            mlflow_run_id=self.mlflow_run_id,
            budget_steps=self.budget_steps,
            budget_replay=self.budget_replay,
        )
