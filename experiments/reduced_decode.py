"""Reduced JPEG decoding at curation ingest (``curation.ingest.decode_min_side``): what it saves
and whether the duplicates and low-quality items curation finds change, on real photos.

1. ``camera``: the camera photos of the Debian wallpaper packages
   (``benchmarks.common.camera_photos``, 1-18 MP JPEGs): ingest ms per image (decode + sha256 +
   pHash + std/entropy + 16-px thumbnail, ``describe_split`` in this process) with a full decode
   and with each candidate ``decode_min_side``, and per image how far the reduced results are
   from the full decode's (thumbnail max abs difference, pHash Hamming distance, std, entropy).
2. ``dedup``: the library steps of curation (ingest -> quality -> embed (pixels) -> deduplicate,
   ``dinoflow.curation.curate``) on the real-photo folder of ``experiments.real_photos``
   (640x480 crops, overlapping ones among them) plus, in a temp folder, exact byte copies and
   quality-80 re-encodes of some of its files and the camera photos with an exact copy, a
   quality-80 re-encode and a half-size copy of each; with ``decode_min_side`` null and each
   candidate: the items removed as exact duplicates, near duplicates and low quality, compared.

    python -m experiments.reduced_decode [--images 10094] [--candidates 128 256 512]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments/results"
PHOTOS = Path("data/10_experiments/real_photos/photos")  # experiments.real_photos folder
N_COPIES = 25  # exact copies and re-encodes of folder files each


def _split(paths: list[Path]):
    from dinoflow.data import Split

    return Split(ids=[p.name for p in paths], labels=np.full(len(paths), -1), class_names=[],
                 channels=3, paths=list(paths), name="train")  # fmt: skip


def _describe(paths: list[Path], min_side: int | None):
    from dinoflow.curation.ingest import describe_split

    return describe_split(_split(paths), "train", 16, 40_000_000, True, 64, 0, min_side)


def _hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def camera(candidates: list[int], repeats: int) -> dict:
    """Ingest ms per camera photo (median of ``repeats``), full vs each candidate, and the
    per-image differences of the reduced results from the full decode's."""
    from PIL import Image

    from benchmarks.common import camera_photos

    photos = camera_photos()
    out: dict = {"images": len(photos), "sizes": [], "progressive": []}
    for p in photos:
        with Image.open(p) as im:
            out["sizes"].append(f"{im.width}x{im.height}")
            out["progressive"].append(bool(im.info.get("progressive")))
    _describe(photos[:1], None)  # imports
    cpu: dict = {m: [[] for _ in photos] for m in [None, *candidates]}
    for r in range(repeats):  # interleaved: the machine's load drifts on every setting alike
        for m in [None, *candidates][:: 1 if r % 2 == 0 else -1]:
            for k, p in enumerate(photos):
                t0 = time.process_time()
                _describe([p], m)
                cpu[m][k].append(1000 * (time.process_time() - t0))
    results = {m: (*_describe(photos, m), [statistics.median(t) for t in cpu[m]]) for m in cpu}
    full, full_thumbs, full_ms = results[None]
    out["full_cpu_ms_per_image"] = round(statistics.mean(full_ms), 1)
    out["full_cpu_ms"] = [round(t, 1) for t in full_ms]
    out["candidates"] = {}
    for m in candidates:
        frame, thumbs, ms = results[m]
        diff = np.abs(thumbs.astype(int) - full_thumbs.astype(int)).reshape(len(photos), -1)
        ham = [_hamming(a, b) for a, b in zip(frame["phash"], full["phash"], strict=True)]
        out["candidates"][str(m)] = {
            "cpu_ms_per_image": round(statistics.mean(ms), 1),
            "cpu_ms": [round(t, 1) for t in ms],
            "speedup": round(statistics.mean(full_ms) / statistics.mean(ms), 2),
            "size_same": bool((frame[["width", "height"]] == full[["width", "height"]]).all().all()),
            "thumb_max_abs_diff": int(diff.max()),
            "thumb_mean_abs_diff": round(float(diff.mean()), 2),
            "phash_hamming_max": max(ham),
            "phash_hamming": ham,
            "std_rel_diff_max": round(float((frame["std"] / full["std"] - 1).abs().max()), 3),
            "std_diff": [round(float(v), 2) for v in frame["std"] - full["std"]],
            "entropy_diff_max_bits": round(float((frame["entropy"] - full["entropy"]).abs().max()), 3),
        }  # fmt: skip
    return out


def build_folder(tmp: Path, source: Path, n_images: int) -> tuple[list[Path], dict]:
    """The folder's first ``n_images`` files (linked), exact copies and q80 re-encodes of some,
    the camera photos with an exact copy, a q80 re-encode and a half-size copy each."""
    from PIL import Image

    from benchmarks.common import camera_photos

    src = sorted(source.glob("*.jpg"))[:n_images]
    folder = tmp / "photos"
    folder.mkdir(parents=True)
    paths = []
    for p in src:
        (folder / p.name).symlink_to(p.resolve())
        paths.append(folder / p.name)
    added: dict = {"exact_copy": [], "reencode_q80": [], "half_size": []}

    def add(kind: str, original: Path, name: str, image=None) -> None:
        path = folder / name
        if image is None:
            shutil.copyfile(original, path)
        else:
            image.save(path, quality=80)
        paths.append(path)
        added[kind].append([name, original.name])

    step = max(1, len(src) // N_COPIES)
    for k, p in enumerate(src[::step][:N_COPIES]):
        add("exact_copy", p, f"copy_{k:02d}.jpg")
        with Image.open(p) as im:
            add("reencode_q80", p, f"q80_{k:02d}.jpg", im.convert("RGB"))
    for k, p in enumerate(camera_photos()):
        shutil.copyfile(p, folder / f"camera_{k:02d}.jpg")
        paths.append(folder / f"camera_{k:02d}.jpg")
        add("exact_copy", paths[-1], f"camera_{k:02d}_copy.jpg")
        with Image.open(p) as im:
            im = im.convert("RGB")
            add("reencode_q80", paths[-1], f"camera_{k:02d}_q80.jpg", im)
            half = im.resize((im.width // 2, im.height // 2), Image.Resampling.BICUBIC)
            add("half_size", paths[-1], f"camera_{k:02d}_half.jpg", half)
    return paths, added


LARGE = (1600, 1200)  # at decode_min_side 256: decoded at 1/4 (400x300)


def build_large(tmp: Path, per_photo: int, seed: int = 0) -> tuple[list[Path], dict]:
    """``per_photo`` LARGE crops (random scale 30-100 % of the largest 4:3 window, random
    position: overlapping crops of one photo are near duplicates) of every distinct wallpaper
    whose 4:3 window is at least LARGE, JPEG quality 90, plus an exact copy and a quality-80
    re-encode of every 10th crop."""
    from PIL import Image, ImageOps

    from experiments.real_photos import distinct_photos

    folder, rng = tmp / "large", np.random.default_rng(seed)
    folder.mkdir(parents=True)
    paths, added = [], {"exact_copy": [], "reencode_q80": []}
    for j, photo in enumerate(distinct_photos()):
        with Image.open(photo) as im:
            if min(im.width / LARGE[0], im.height / LARGE[1]) < 1.0:
                continue
            rgb = ImageOps.exif_transpose(im).convert("RGB")
        full = min(rgb.width / LARGE[0], rgb.height / LARGE[1])
        for k in range(per_photo):
            s = max(1.0, full * float(np.sqrt(rng.uniform(0.3, 1.0))))
            cw, ch = int(LARGE[0] * s), int(LARGE[1] * s)
            x, y = (
                int(rng.integers(0, rgb.width - cw + 1)),
                int(rng.integers(0, rgb.height - ch + 1)),
            )
            crop = rgb.crop((x, y, x + cw, y + ch)).resize(LARGE, Image.Resampling.LANCZOS)
            paths.append(folder / f"{j:03d}_{k}.jpg")
            crop.save(paths[-1], quality=90)
            if len(paths) % 10 == 0:
                shutil.copyfile(paths[-1], folder / f"{j:03d}_{k}_copy.jpg")
                crop.save(folder / f"{j:03d}_{k}_q80.jpg", quality=80)
                added["exact_copy"].append([f"{j:03d}_{k}_copy.jpg", paths[-1].name])
                added["reencode_q80"].append([f"{j:03d}_{k}_q80.jpg", paths[-1].name])
    extra = [folder / name for pairs in added.values() for name, _ in pairs]
    return paths + extra, added


def curate_once(paths: list[Path], min_side: int | None) -> dict:
    """ingest -> quality -> embed -> deduplicate with ``decode_min_side`` = min_side."""
    from dinoflow.curation import curate
    from dinoflow.curation.config import curation_config

    cfg = curation_config({"workers": 2, "show_progress": False,
                           "ingest": {"decode_min_side": min_side}})  # fmt: skip
    splits = {"train": _split(paths)}
    t0 = time.perf_counter()
    meta, thumbs = curate.ingest(splits, cfg)
    ingest_s = time.perf_counter() - t0
    meta = curate.quality(meta, cfg)
    emb = curate.embed(meta, thumbs, splits, cfg)
    meta = curate.deduplicate(meta, emb, cfg)
    comps = meta[meta["component"] >= 0].groupby("component")["item_id"]
    return {
        "ingest_s": round(ingest_s, 1),
        "reason": dict(zip(meta["item_id"], meta["reason"], strict=True)),
        "components": sorted(sorted(g) for _, g in comps),
        "phash": dict(zip(meta["item_id"], meta["phash"], strict=True)),
    }


def compare(full: dict, reduced: dict) -> dict:
    """Counts per reason group and the symmetric differences of the removed sets."""
    groups = {
        "exact_duplicate": {"exact_duplicate"},
        "near_duplicate": {"near_duplicate"},
        "low_quality": {
            "unreadable",
            "too_large",
            "too_small",
            "extreme_aspect",
            "low_information",
        },
    }
    out: dict = {"ingest_s": [full["ingest_s"], reduced["ingest_s"]]}
    for name, reasons in groups.items():
        a = {i for i, r in full["reason"].items() if r in reasons}
        b = {i for i, r in reduced["reason"].items() if r in reasons}
        out[name] = {"full": len(a), "reduced": len(b), "only_full": sorted(a - b),
                     "only_reduced": sorted(b - a)}  # fmt: skip
    fc = {tuple(c) for c in full["components"]}
    rc = {tuple(c) for c in reduced["components"]}
    out["components"] = {"full": len(fc), "reduced": len(rc), "only_full": sorted(fc - rc),
                         "only_reduced": sorted(rc - fc)}  # fmt: skip
    ham = [_hamming(a, reduced["phash"][i]) for i, a in full["phash"].items() if a]
    out["phash_changed"] = sum(h > 0 for h in ham)
    out["phash_hamming_max"] = max(ham, default=0)
    return out


def dedup(candidates: list[int], source: Path | None, n_images: int) -> dict:
    """The folder with added copies (``source`` None: the LARGE crops), curated with each
    decode_min_side, compared to full."""
    tmp = Path(tempfile.mkdtemp(prefix="reduced-decode-"))
    try:
        if source is None:
            paths, added = build_large(tmp, n_images)
        else:
            paths, added = build_folder(tmp, source, n_images)
        runs = {}
        for m in [None, *candidates]:
            runs[m] = curate_once(paths, m)
            print(f"decode_min_side={m}: ingest {runs[m]['ingest_s']} s", flush=True)
    finally:
        shutil.rmtree(tmp)
    reasons = runs[None]["reason"]
    n_added = sum(len(v) for v in added.values()) + len(added.get("half_size", []))  # + originals
    out: dict = {"images": len(paths), "folder_images": len(paths) - n_added, "added": added}
    out["added_found_full"] = {
        kind: sum(reasons[name] != "" or reasons[orig] != "" for name, orig in pairs)
        for kind, pairs in added.items()
    }
    out["compare"] = {str(m): compare(runs[None], runs[m]) for m in candidates}
    return out


NOTES = """Notes. CPU time is the process's (the machine is shared; wall times, such as the
ingest seconds above with 2 worker processes, drift with its load). libjpeg's scaled decoding
saves the inverse DCT and the pixel work after it, not the Huffman decoding of every
coefficient: a progressive 16 MB JPEG (5640x3172) still takes about 0.5 s of CPU. With 256 the
640x480 crops are not reduced at all (1/2 would make their shorter side 240 < 256): only the
camera photos and their copies are; the 1600x1200 crops are decoded at 1/4 (400x300) with 256
and at 1/8 (200x150) with 128, and 128 decodes the 640x480 crops at 1/2 (320x240). What a
reduced decode changes: grey std and entropy drop (fine texture and noise are averaged out),
so near-flat crops cross the low_information thresholds (an exact copy of such a crop then
leaves as low quality instead of as an exact duplicate), and pHash on low-texture crops (sky,
haze), whose DCT is dominated by fine detail, moves by more than a few bits, so some pairs at
the 4-bit threshold join or leave a near-duplicate group. Exact duplicates never differed
otherwise."""


def dedup_markdown(title: str, dd: dict) -> list[str]:
    """One curation comparison: the table and what differs."""
    n_added = sum(len(v) for v in dd["added"].values())
    originals = dd["images"] - dd["folder_images"] - n_added  # the camera photos themselves
    lines = ["", f"## {title} ({dd['images']} files: {dd['folder_images']} crops"
             + (f", {originals} camera photos" if originals else "") + ", added copies: "
             f"{', '.join(f'{k} {len(v)}' for k, v in dd['added'].items())})", "",
             f"Added copies found with a full decode: {dd['added_found_full']}", "",
             "| decode_min_side | ingest s (full, reduced) | exact dup (full/reduced, diff) "
             "| near dup (full/reduced, diff) | low quality (full/reduced, diff) "
             "| components diff | pHash changed / max Hamming |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, c in dd["compare"].items():
        cells = [
            f"{c[g]['full']}/{c[g]['reduced']}, {len(c[g]['only_full']) + len(c[g]['only_reduced'])}"
            for g in ("exact_duplicate", "near_duplicate", "low_quality")
        ]
        comp = len(c["components"]["only_full"]) + len(c["components"]["only_reduced"])
        lines.append(f"| {m} | {c['ingest_s']} | {' | '.join(cells)} | {comp} | "
                     f"{c['phash_changed']} / {c['phash_hamming_max']} |")  # fmt: skip
    lines += ["", "What differs (items removed as near duplicates / low quality with one decode "
              "and not the other; a component: a near-duplicate group, as a set of items):", ""]  # fmt: skip
    for m, c in dd["compare"].items():
        near, low = c["near_duplicate"], c["low_quality"]
        to_low = set(near["only_full"]) & set(low["only_reduced"])
        lines.append(
            f"- {m}: low quality only with the reduced decode: {len(low['only_reduced'])} "
            f"(only with full: {len(low['only_full'])}); of the {len(near['only_full'])} near "
            f"duplicates only with full, {len(to_low)} are low quality with the reduced decode, "
            f"the other {len(near['only_full']) - len(to_low)} and the "
            f"{len(near['only_reduced'])} near duplicates only with the reduced decode come from "
            "edges of the near-duplicate graph (pHash <= 4 bits, or cosine >= 0.998 among the 16 "
            "nearest) present with one decode and not the other; exact duplicates: "
            f"{len(c['exact_duplicate']['only_full']) + len(c['exact_duplicate']['only_reduced'])} "
            "differ."
        )
    return lines


def markdown(res: dict) -> str:
    cam = res["camera"]
    lines = [
        "# Reduced JPEG decoding at curation ingest", "",
        f"CPU: {res['cpu']} ({res['cores']} cores). `python -m experiments.reduced_decode`.", "",
        f"## Camera photos ({cam['images']} JPEGs, {', '.join(sorted(set(cam['sizes'])))})", "",
        f"Full decode: {cam['full_cpu_ms_per_image']} ms of CPU per image (one process; "
        f"{sum(cam['progressive'])} of them progressive JPEGs).", "",
        "| decode_min_side | CPU ms/image | speed-up | thumb max/mean abs diff | pHash Hamming max "
        "| std rel. diff max | entropy diff max (bits) |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for m, c in cam["candidates"].items():
        lines.append(
            f"| {m} | {c['cpu_ms_per_image']} | {c['speedup']}x | {c['thumb_max_abs_diff']} / "
            f"{c['thumb_mean_abs_diff']} | {c['phash_hamming_max']} | {c['std_rel_diff_max']} "
            f"| {c['entropy_diff_max_bits']} |"
        )
    if "dedup" in res:
        lines += dedup_markdown("Curation on the 640x480 real-photo folder", res["dedup"])
    if "large" in res:
        lines += dedup_markdown(f"Curation on {LARGE[0]}x{LARGE[1]} crops of the wallpapers",
                                res["large"])  # fmt: skip
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.common import cpu_model
    from dinoflow.parallel import usable_cores

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", type=Path, default=ROOT / PHOTOS, help="the real-photo crops")
    ap.add_argument("--images", type=int, default=10_094, help="folder crops used")
    ap.add_argument("--candidates", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-photo", type=int, default=8, help="large: crops per wallpaper")
    ap.add_argument("--part", choices=["camera", "dedup", "large", "all", "report"], default="all")
    args = ap.parse_args(argv)
    res: dict = {"cpu": cpu_model(), "cores": usable_cores()}
    json_path = RESULTS / "reduced_decode.json"
    if json_path.is_file():
        res = {**json.loads(json_path.read_text()), **res}
    if args.part in ("camera", "all"):
        res["camera"] = camera(args.candidates, args.repeats)
    if args.part in ("dedup", "all"):
        res["dedup"] = dedup(args.candidates, args.folder, args.images)
    if args.part in ("large", "all"):
        res["large"] = dedup(args.candidates, None, args.per_photo)
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    if "camera" in res:
        (RESULTS / "reduced_decode.md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
