"""Benchmark (not a test): one full DINOv2 pretraining step, dinoflow vs lightly's DINOv2 parts.

    python -m benchmarks.bench_step                       # CPU profile + ViT-S/14 shape, JSON out
    python -m benchmarks.bench_step --profiles cpu --repeats 3 --threads 2

A step is: teacher forward on the 2 global crops (no grad), student forward on global crops
(masked) and local crops, DINO + iBOT + KoLeo losses, backward, AdamW, teacher EMA.

Contenders, built from the same config (backbone, crops, batch, head sizes) and fed the same
batches and masks:
- ``dinoflow``: ``dinoflow.training.Trainer.step`` of the ``DINOv2`` method (``dinoflow.methods``)
  builds and ``wrap_for_training`` wraps: the set-up ``dinoflow.training.pretrain`` trains with.
- ``lightly``: the step of lightly's ``examples/pytorch/dinov2.py`` (lightly 1.6):
  ``MaskedVisionTransformerTIMM`` student/teacher over the same timm ``VisionTransformer``,
  ``DINOv2ProjectionHead`` (shared DINO/iBOT head unless the config separates them),
  ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss`` (weight 0.1), ``AdamW(model.parameters())``,
  the weight-decay loop and ``update_momentum`` on backbone and heads.

Profiles:
- ``cpu``: ``conf/base/parameters_pretrain.yml`` ``pretrain:`` as it is at benchmark time
  (1-channel Fashion-MNIST crops), in one process with the global batch (batch_size times the
  launcher's processes); ``bench_ddp.py`` measures it as conf/base runs it, in DDP processes.
- ``vit_s14``: the ViT-S/14 shape (embed 384, depth 12, 6 heads, patch 14) at a size 2 cores can
  run: global crops 112, local crops 42 (multiples of 14), 2 + 4 crops, batch 8, K = 8192
  prototypes (head hidden 2048, bottleneck 256), RGB; other settings from the CPU profile.

Reported per profile: median seconds per step and images/s of each contender and their ratio;
FLOPs of one dinoflow step (``torch.utils.flop_counter.FlopCounterMode``: student forward +
backward, teacher forward, losses; matmul-class ops) and the model FLOP utilisation = FLOPs /
median step time / fp32 matmul rate measured in the same process; peak resident memory above
the starting point during one step of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import numpy as np
import torch
import yaml
from timm.models.vision_transformer import Block

from benchmarks.common import (
    ROOT,
    PeakRSS,
    interleaved_times,
    machine_info,
    matmul_block,
    matmul_rate,
    median,
)
from dinoflow.config import PretrainConfig, deep_merge
from dinoflow.training import (
    DINOv2,
    MultiCropCollate,
    MultiCropDataset,
    StepMasks,
    Trainer,
    backbone_from_config,
    precision_choice,
    total_steps_for,
    wrap_for_training,
)
from dinoflow.training.data import build_augmentation

VIT_S14 = {
    "crops": {"global_size": 112, "local_size": 42, "n_local": 4},
    "backbone": {"arch": "custom", "patch_size": 14, "embed_dim": 384, "depth": 12,
                 "num_heads": 6, "mlp_ratio": 4.0},
    "head": {"n_prototypes": 8192, "hidden_dim": 2048, "bottleneck_dim": 256},
    "train": {"batch_size": 8},
}  # fmt: skip



def profile_config(name: str) -> tuple[PretrainConfig, int]:
    """(config, image channels) of a benchmark profile, read from conf/ now."""
    params = yaml.safe_load((ROOT / "conf/base/parameters_pretrain.yml").read_text())["pretrain"]
    params = deep_merge(params, {"train": {"device": "cpu", "compile": params["train"]["compile"]}})
    # one process for the whole global batch (conf/base's batch_size is per DDP process)
    launcher = params.get("launcher", {})
    if launcher.get("type") == "torchrun":
        params["train"]["batch_size"] *= int(launcher.get("nproc_per_node", 1))
    if name == "cpu":
        return PretrainConfig.model_validate(params), 1
    if name == "photos":  # conf/photos over conf/base, as `kedro run --env photos` merges them
        photos = yaml.safe_load((ROOT / "conf/photos/parameters_pretrain.yml").read_text())
        merged = deep_merge(params, photos["pretrain"])
        merged["train"].update(device="cpu", num_workers=0)
        return PretrainConfig.model_validate(merged), 3
    if name == "vit_s14":
        return PretrainConfig.model_validate(deep_merge(params, VIT_S14)), 3
    raise ValueError(f"unknown profile {name!r}: cpu, photos or vit_s14")


def make_batches(cfg: PretrainConfig, channels: int, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n synthetic collated batches (normalised crops, training masks drawn as in training)."""
    g = torch.Generator().manual_seed(seed)
    b, c = cfg.train.batch_size, cfg.crops
    masking = StepMasks(cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"seed": seed})}), 0, 1)
    batches = []
    for i in range(n):
        masks = masking.masks(step=i, global_batch=b)
        batches.append({
            "global_crops": torch.randn(2 * b, channels, c.global_size, c.global_size, generator=g),
            "local_crops": torch.randn(c.n_local * b, channels, c.local_size, c.local_size,
                                       generator=g),
            "masks": masks, "max_masked": masking.max_masked(b), "n_local": c.n_local,
            "batch_size": b, "step": i,
        })  # fmt: skip
    return batches


# --------------------------------------------------------------------------- dinoflow
class DinoflowStep:
    """``dinoflow.training.Trainer.step`` of the DINOv2 method on the run's own parts (single
    process, CPU), at a step in the middle of the run (warm-ups over, last layer unfrozen)."""

    def __init__(self, cfg: PretrainConfig, channels: int, seed: int = 0, world_size: int = 1):
        self.cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"seed": seed})})
        # the run's own length: conf/base's epochs of steps_per_epoch (real epochs: 50k images)
        cpu = torch.device("cpu")
        self.method = DINOv2(self.cfg, channels, cpu)
        self.trainer = Trainer(self.method, self.cfg, 50_000, world_size, cpu)
        self.step0 = self.trainer.state.total_steps // 2
        # DDP across the processes of a torch.distributed group (benchmarks/bench_ddp.py)
        self.model = wrap_for_training(self.method.student, self.method.teacher, self.cfg,
                                       world_size, cpu, fsdp=False)

    @property
    def student(self) -> torch.nn.Module:
        return self.method.student

    def __call__(self, batch: dict[str, Any], i: int) -> torch.Tensor:
        self.trainer.train_mode(self.model)
        return self.trainer.step(self.model, batch, self.step0 + i)["loss/total"]


# --------------------------------------------------------------------------- lightly
class LightlyStep:
    """The training step of lightly's examples/pytorch/dinov2.py, sized by the same config."""

    def __init__(self, cfg: PretrainConfig, channels: int, seed: int = 0, bf16: bool = False):
        from functools import partial

        from lightly.loss import DINOLoss as LDINOLoss
        from lightly.loss import IBOTPatchLoss as LIBOTPatchLoss
        from lightly.loss import KoLeoLoss as LKoLeoLoss
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate, update_momentum
        from lightly.utils.scheduler import cosine_schedule

        self.cfg, self.update_momentum, self.cosine_schedule = cfg, update_momentum, cosine_schedule
        self.bf16 = bf16  # the same autocast as dinoflow's step when the run trains in bf16
        self.total_steps = total_steps_for(cfg, 50_000, 1)[0]  # the same run length
        torch.manual_seed(seed)
        h = cfg.head
        # the same timm VisionTransformer as dinoflow's backbone (sizes, no_embed_class,
        # LayerScale, eps), without drop-path: lightly sets that on the student below
        vit = backbone_from_config(cfg.backbone.model_copy(update={"drop_path_rate": 0.0}),
                                   cfg.crops.global_size, channels).vit
        for block in vit.blocks:  # timm's own Block (dinoflow's DinoBlock only adds fast paths)
            block.__class__ = Block
        self.teacher_backbone = MaskedVisionTransformerTIMM(
            vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        update_drop_path_rate(self.student_backbone.vit, drop_path_rate=cfg.backbone.drop_path_rate,
                              mode="uniform")
        head = partial(DINOv2ProjectionHead, input_dim=vit.embed_dim, hidden_dim=h.hidden_dim,
                       bottleneck_dim=h.bottleneck_dim, output_dim=h.n_prototypes)
        self.student_dino, self.teacher_dino = head(), head()
        if h.separate_ibot_head:
            ibot = partial(head, output_dim=h.ibot_n_prototypes or h.n_prototypes)
            self.student_ibot, self.teacher_ibot = ibot(), ibot()
        else:
            self.student_ibot, self.teacher_ibot = self.student_dino, self.teacher_dino
        self.student_head = torch.nn.ModuleList([self.student_dino, self.student_ibot])
        self.teacher_head = torch.nn.ModuleList([self.teacher_dino, self.teacher_ibot])
        for module in (self.teacher_backbone, self.teacher_head):  # freeze_eval_module
            module.requires_grad_(False)
            module.eval()
        self.model = torch.nn.ModuleList([self.teacher_backbone, self.student_backbone,
                                          self.student_head, self.teacher_head])
        lc = cfg.loss
        k_ibot = (h.ibot_n_prototypes or h.n_prototypes) if h.separate_ibot_head else h.n_prototypes
        self.dino_criterion = LDINOLoss(output_dim=h.n_prototypes, student_temp=lc.student_temp,
                                        center_momentum=lc.center_momentum)
        self.ibot_criterion = LIBOTPatchLoss(output_dim=k_ibot, student_temp=lc.student_temp,
                                             center_momentum=lc.center_momentum)
        self.koleo_criterion = LKoLeoLoss()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.001)

    def __call__(self, batch: dict[str, Any], i: int) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            return self._step(batch, i)

    def _step(self, batch: dict[str, Any], i: int) -> torch.Tensor:
        o = self.cfg.optim
        step = self.total_steps // 2 + i
        global_views, local_views = batch["global_crops"], batch["local_crops"]
        n_views = 2 + batch["n_local"]
        n = len(global_views)
        seq_len = self.teacher_backbone.sequence_length
        hh, ww = self.teacher_backbone.vit.patch_embed.grid_size
        block_mask = batch["masks"].view(n, hh, ww)
        mask = global_views.new_zeros((n, seq_len), dtype=torch.bool)
        mask[:, 1:] = block_mask.flatten(start_dim=1)

        with torch.no_grad():
            features = self.teacher_backbone.encode(global_views)
            teacher_cls_out = self.teacher_dino(features[:, 0])
            teacher_masked_out = self.teacher_ibot(features[mask])
        features = self.student_backbone.encode(global_views, mask=mask)
        student_global_cls_token = features[:, 0]
        student_global_cls_out = self.student_dino(student_global_cls_token)
        student_global_masked_out = self.student_ibot(features[mask])
        student_local_cls_out = self.student_dino(self.student_backbone.encode(local_views)[:, 0])
        student_cls_out = torch.cat([student_global_cls_out, student_local_cls_out])

        teacher_temp = o.teacher_temp_end
        dino_loss = self.dino_criterion(teacher_out=teacher_cls_out.chunk(2),
                                        student_out=student_cls_out.chunk(n_views),
                                        teacher_temp=teacher_temp)
        ibot_loss = self.ibot_criterion(teacher_out=teacher_masked_out,
                                        student_out=student_global_masked_out, mask=block_mask,
                                        teacher_temp=teacher_temp)
        koleo_loss = 0.1 * sum(self.koleo_criterion(t) for t in student_global_cls_token.chunk(2))
        loss = dino_loss + ibot_loss + koleo_loss
        loss.backward()
        weight_decay = self.cosine_schedule(step=step, max_steps=self.total_steps,
                                            start_value=o.weight_decay_start,
                                            end_value=o.weight_decay_end)
        for group in self.optimizer.param_groups:
            if group["weight_decay"] != 0.0:
                group["weight_decay"] = weight_decay
        self.optimizer.step()
        self.optimizer.zero_grad()
        momentum = self.cosine_schedule(step=step, max_steps=self.total_steps,
                                        start_value=o.momentum_teacher_start,
                                        end_value=o.momentum_teacher_end)
        self.update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        self.update_momentum(self.student_head, self.teacher_head, m=momentum)
        return loss.detach()


# --------------------------------------------------------------------------- measuring
def _cpu_flash(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args,
                        out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def eager_twin(cfg: PretrainConfig) -> PretrainConfig:
    """The same config without torch.compile."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": False})})


def count_flops(step: Any, batch: dict[str, Any]) -> int:
    """FLOPs of one full step (FlopCounterMode: matmuls, convolutions, attention; the CPU
    flash-attention kernels are not in torch's table, so they are added here)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step(batch, 0)
    return int(counter.get_total_flops())


def bench_loader(cfg: PretrainConfig, channels: int, n_batches: int = 2) -> dict[str, float]:
    """Multi-crop augmentation + masking collate of the training loader, one worker's work
    (1 thread): images/s and CPU seconds per batch (uint8 images: Fashion-MNIST's 28 x 28, or
    64 x 64 RGB for the RGB profile)."""
    from dinoflow.data import Split

    b = cfg.train.batch_size
    rng = np.random.default_rng(0)
    shape = (b * n_batches, 28, 28) if channels == 1 else (b * n_batches, 64, 64, 3)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    split = Split(ids=[str(i) for i in range(len(images))], labels=np.zeros(len(images), np.int64),
                  class_names=["x"], channels=channels, images=images)
    aug = build_augmentation(cfg.crops, [0.5] * channels, [0.25] * channels)
    dataset, collate = MultiCropDataset(split, 0), MultiCropCollate(aug, StepMasks(cfg, 0, 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch sets 1 thread there)
    try:
        c0, t0 = time.process_time(), time.perf_counter()
        for k in range(n_batches):
            collate([dataset[(k, 0, i)] for i in range(k * b, (k + 1) * b)])
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(threads)
    return {"images_per_s_one_process": b * n_batches / wall,
            "cpu_s_per_batch": cpu / n_batches, "images_per_cpu_s": b * n_batches / cpu}


def bench_profile(name: str, repeats: int, threads: int, with_lightly: bool = True) -> dict:
    """Interleaved dinoflow / lightly steps (and a matmul block) of one profile -> a result."""
    # a fresh dynamo cache per profile: the compiled models of earlier profiles (and thread
    # counts) would otherwise count against the recompile limit and leave this one eager
    torch._dynamo.reset()
    cfg, channels = profile_config(name)
    batches = make_batches(cfg, channels, n=4)
    # the precision the run would train in (train.precision auto: bf16 only on a CPU with bf16
    # matrix units for shapes large enough); lightly's step runs under the same autocast
    precision, precision_reason = precision_choice(cfg, torch.device("cpu"))
    contenders: dict[str, Any] = {"dinoflow": DinoflowStep(cfg, channels)}
    if with_lightly:
        contenders["lightly"] = LightlyStep(cfg, channels, bf16=precision == "bf16")
    # FLOPs of an eager twin (the counter does not see inside compiled graphs; same arithmetic)
    flops = {k: count_flops(DinoflowStep(eager_twin(cfg), channels) if k == "dinoflow" else step,
                            batches[0]) for k, step in contenders.items()}
    for step in contenders.values():  # warm-up outside the timings (torch.compile compiles here)
        for i in (2, 3):
            step(batches[i], i)
    peak = {}
    for k, step in contenders.items():
        with PeakRSS() as mem:
            step(batches[1], 1)
        peak[k] = mem.extra
    # the peak the step is measured against: matmuls in the precision it uses (both measured)
    step_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peaks = {"fp32": matmul_rate(), "bf16": matmul_rate((1024,), repeats=2, dtype=torch.bfloat16)}
    mm_run, mm_flop = matmul_block(dtype=step_dtype,
                                   flop=2e10 if peaks[precision] > 2e10 else peaks[precision])
    rate_best = peaks[precision]
    runs = {k: (lambda i, s=s: s(batches[i % len(batches)], i)) for k, s in contenders.items()}
    times = interleaved_times({**runs, "matmul": mm_run}, repeats=repeats, warmup=1)
    rate_best = max(rate_best, matmul_rate(dtype=step_dtype) if precision == "fp32" else rate_best)
    med = {k: {m: median(v) for m, v in t.items()} for k, t in times.items()}
    rate = {m: mm_flop / med["matmul"][m] for m in ("wall", "cpu")}  # FLOP per (CPU) second
    b = cfg.train.batch_size
    backbone = backbone_from_config(cfg.backbone, cfg.crops.global_size, channels)
    out: dict[str, Any] = {
        "profile": name,
        "config": {
            "global_size": cfg.crops.global_size, "local_size": cfg.crops.local_size,
            "n_local": cfg.crops.n_local, "batch_size": b, "channels": channels,
            "patch_size": cfg.backbone.patch_size, "embed_dim": backbone.embed_dim,
            "depth": backbone.depth, "num_heads": backbone.vit.blocks[0].attn.num_heads,
            "n_prototypes": cfg.head.n_prototypes, "head_hidden_dim": cfg.head.hidden_dim,
            "bottleneck_dim": cfg.head.bottleneck_dim,
            "separate_ibot_head": cfg.head.separate_ibot_head,
            "drop_path_rate": cfg.backbone.drop_path_rate, "compile": cfg.train.compile,
        },
        "threads": threads, "repeats": repeats,
        "precision": precision, "precision_reason": precision_reason,
        "matmul_gflops_fp32_best": peaks["fp32"] / 1e9, "matmul_gflops_bf16_best": peaks["bf16"] / 1e9,
        "matmul_gflops": rate["wall"] / 1e9,
        "matmul_gflops_per_cpu_s": rate["cpu"] / 1e9,
        "matmul_gflops_best": rate_best / 1e9,
    }  # fmt: skip
    for k in contenders:
        out[k] = {
            "step_s_median": med[k]["wall"], "step_cpu_s_median": med[k]["cpu"],
            "step_s_all": times[k]["wall"], "step_cpu_s_all": times[k]["cpu"],
            "images_per_s": b / med[k]["wall"], "gflop_per_step": flops[k] / 1e9,
            "achieved_gflops": flops[k] / med[k]["wall"] / 1e9,
            "peak_rss_extra_mb": peak[k] / 2**20,
        }  # fmt: skip
    f = flops["dinoflow"]
    # utilisation: the step's FLOP rate over the matmul rate under the same load (wall), over
    # the same measure in CPU seconds (robust to other processes), and over the best matmul
    # burst seen (the most conservative)
    out["mfu"] = f / med["dinoflow"]["wall"] / rate["wall"]
    out["mfu_cpu_time"] = f / med["dinoflow"]["cpu"] / rate["cpu"]
    out["mfu_vs_best_matmul"] = f / med["dinoflow"]["wall"] / rate_best
    if with_lightly:
        out["step_ratio_vs_lightly"] = med["lightly"]["wall"] / med["dinoflow"]["wall"]
        out["step_ratio_vs_lightly_cpu_time"] = med["lightly"]["cpu"] / med["dinoflow"]["cpu"]
        # per repetition (A and B ran back to back): a second, pairwise estimate
        pairs = [lt / dt for lt, dt in zip(times["lightly"]["wall"], times["dinoflow"]["wall"],
                                           strict=True)]
        out["step_ratio_vs_lightly_pairwise_median"] = median(pairs)
    out["data_loader"] = bench_loader(cfg, channels)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profiles", nargs="+", default=["cpu", "photos", "vit_s14"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-lightly", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(args.threads),
              "profiles": {p: bench_profile(p, args.repeats, args.threads, not args.no_lightly)
                           for p in args.profiles}}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
