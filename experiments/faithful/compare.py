"""Re-run the comparison table of docs/faithfulness.md from the committed fixtures (no official code needed).

    python -m experiments.faithful.compare > experiments/faithful/results.md

For each place where a config key chooses between facebookresearch/dinov2's arithmetic (the
default) and another value, the max abs difference from the official figures
(tests/fixtures/dinov2_reference/, written by make_fixtures.py) with dinoflow's default and with
the other value. About a minute on one core.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinoflow.models.heads import DINOHead
from dinoflow.optim import apply_schedules, build_optimizer, param_groups
from dinoflow.schedules import build_schedules
from experiments.faithful import reference as ref
from experiments.faithful.reference import mask_stats, official_name, stream_masks

ROOT = Path(__file__).resolve().parents[2]

META = ref.load_fixture("meta")


def rel(got: torch.Tensor, want: np.ndarray) -> float:
    """max |got - want| / max |want| of one tensor."""
    return float(np.abs(got.detach().numpy() - want).max() / np.abs(want).max())


def head_rows() -> list[str]:
    arrays, info = ref.load_fixture("head"), META["head"]
    rows = []
    for norm_last_layer in (False, True):
        worst = {"out": 0.0, "grad": 0.0, "step1": 0.0, "step2": 0.0}
        for case in ("init", "random_g"):
            head = DINOHead(**info["config"], norm_last_layer=norm_last_layer)
            head.load_state_dict({n: torch.from_numpy(arrays[f"{case}/state/{official_name(n)}"])
                                  for n in head.state_dict()})
            opt = build_optimizer(param_groups(nn.Module(), {"dino_head": head}))
            x, w = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["w"])
            for step, frozen in ((1, True), (2, False)):
                opt.zero_grad()
                out = head(x)
                (out * w).sum().backward()
                if step == 1:
                    worst["out"] = max(worst["out"], rel(out, arrays[f"{case}/out"]))
                    worst["grad"] = max(worst["grad"], max(
                        rel(p.grad if p.grad is not None else torch.zeros_like(p),
                            arrays[f"{case}/grad/{official_name(n)}"])
                        for n, p in head.named_parameters()))
                apply_schedules(opt, info["lr"], info["wd"], freeze_last_layer=frozen)
                opt.step()
                worst[f"step{step}"] = max(worst[f"step{step}"], max(float(np.abs(
                    p.detach().numpy() - arrays[f"{case}/step{step}/{official_name(n)}"]).max())
                    for n, p in head.named_parameters()))
        trainable = {official_name(n) for n, p in head.named_parameters() if p.requires_grad}
        missing = set(info["official"]["init"]["trainable"]) - trainable
        label = "`head.norm_last_layer: true` (other value)" if norm_last_layer else "default"
        rows.append(f"| DINO head | {label} | relative (max diff / max value per tensor): "
                    f"outputs {worst['out']:.2g}, gradients "
                    f"{worst['grad']:.2g}; absolute, weights after AdamW step 1 (frozen) "
                    f"{worst['step1']:.2g} / step 2 {worst['step2']:.2g}; trainable tensors "
                    f"missing: {sorted(missing) or 'none'} |")
    return rows


def pos_rows(tmp: Path) -> list[str]:
    rows = []
    d = ref.pos_embed_differences()
    rows.append(f"| position embeddings (37 -> 7, 16, 7x16; 16 -> 7, 37; both official settings) "
                f"| default | {max(d.values()):.2g} |")
    for label, kw in (("default", {}),
                      ("`interpolate_offset: 0.0, interpolate_antialias: true` (other value: timm's "
                       "resample)", {"interpolate_offset": 0.0, "interpolate_antialias": True})):
        for model in ("vits14_518", "vits14_reg4_518", "vits14_224"):
            diffs = ref.vit_differences(model, tmp, **kw)
            cells = ", ".join(f"{s}: patch {v['patches']:.2g} / CLS {v['cls']:.2g}"
                              for s, v in diffs.items())
            rows.append(f"| ViT-S/14 `{model}` forward | {label} | {cells} |")
    for model in ("vits14_518", "vits14_reg4_518"):
        diffs = ref.vit_differences(model, tmp, img_size=224, sizes=["98x98", "224x224"])
        cells = ", ".join(f"{s}: patch {v['patches']:.2g} / CLS {v['cls']:.2g}"
                          for s, v in diffs.items())
        rows.append(f"| ViT-S/14 `{model}` resized at load to a 224 px backbone | default "
                    f"| {cells} |")
    return rows


def mask_rows() -> list[str]:
    rows = []
    arrays = ref.load_fixture("masking")
    for reject in (False, True):
        label = "`masking.reject_small_blocks: true` (other value)" if reject else "default"
        cells = []
        for name in ("16x16", "7x7"):
            info = META["masking"][name]
            masks, _ = stream_masks(tuple(info["grid"]), info["batches"], info["seed"],
                                     reject_small_blocks=reject)
            packed = np.packbits(masks, axis=1)
            if hashlib.sha256(packed.tobytes()).hexdigest() == info["sha256_packed"]:
                cells.append(f"{name}: all {len(masks)} masks identical on the shared stream")
            else:  # once one mask differs the streams drift apart
                same = int((masks.sum(1) == arrays[f"{name}/counts"]).sum())
                cells.append(f"{name}: masks differ; {same} of {len(masks)} with the official "
                             "count")
        s, want = mask_stats(reject), META["masking"]["stats"]
        cells.append(f"own random streams, 12,000 masked 16x16 crops: requested count hit "
                     f"{s['hit_rate']:.1%} (official {want['hit_rate']:.1%}), mean shortfall "
                     f"{s['mean_shortfall']:.3f} (official {want['mean_shortfall']:.3f})")
        rows.append(f"| block masking | {label} | {'; '.join(cells)} |")
    return rows


def schedule_rows() -> list[str]:
    arrays = ref.load_fixture("schedules")
    rows = []
    for convention in ("dinov2", "exact_ends"):
        cells = []
        for name, c in META["schedules"].items():
            s, _ = build_schedules(
                total_steps=c["epochs"] * c["OFFICIAL_EPOCH_LENGTH"],
                steps_per_epoch=c["OFFICIAL_EPOCH_LENGTH"], base_lr=c["lr"], min_lr=c["min_lr"],
                warmup_epochs=c["warmup_epochs"], wd_start=c["weight_decay"],
                wd_end=c["weight_decay_end"], momentum_start=c["momentum_teacher"],
                momentum_end=c["final_momentum_teacher"],
                teacher_temp_start=c["warmup_teacher_temp"], teacher_temp_end=c["teacher_temp"],
                teacher_temp_warmup_epochs=c["warmup_teacher_temp_epochs"],
                freeze_last_layer_epochs=c["freeze_last_layer_epochs"], convention=convention)
            got = {"lr": s.lr, "wd": s.wd, "momentum": s.momentum,
                   "teacher_temp": s.teacher_temp,
                   "last_layer_lr": np.where(s.last_layer_lr_zero, 0.0, s.lr)}
            rel = {k: float(np.abs(v - arrays[f"{name}/{k}"]).max()
                            / np.abs(arrays[f"{name}/{k}"]).max()) for k, v in got.items()}
            w = c["warmup_epochs"] * c["OFFICIAL_EPOCH_LENGTH"]
            t = c["warmup_teacher_temp_epochs"] * c["OFFICIAL_EPOCH_LENGTH"]
            cells.append(f"{name}: max diff / max value " + ", ".join(
                f"{k} {v:.2g}" for k, v in rel.items())
                + f"; lr at step {w - 1} {s.lr[w - 1] / arrays[f'{name}/lr'][w - 1]:.4f} x official,"
                f" teacher temp at step {t - 1} {s.teacher_temp[t - 1]:.5f}"
                f" (official {arrays[f'{name}/teacher_temp'][t - 1]:.5f})")
        label = ("`optim.schedule_convention: exact_ends` (other value)" if convention != "dinov2"
                 else "default")
        rows.append(f"| schedules | {label} | {'; '.join(cells)} |")
    return rows


def main() -> None:
    torch.set_num_threads(1)  # as the tests (conftest): the same summation order
    print(f"dinov2 commit {META['dinov2_commit']}, fixtures made with torch {META['torch']}; "
          f"compared with torch {torch.__version__}\n")
    print("| where | dinoflow | max abs difference from the official code |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for row in head_rows() + pos_rows(Path(tmp)) + mask_rows() + schedule_rows():
            print(row)


if __name__ == "__main__":
    main()
