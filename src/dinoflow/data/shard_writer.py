"""``dinoflow-shards write``: a folder of images, or its curated set, -> tar shards that
``data.source=shards`` reads (the WebDataset layout).

Written with ``webdataset.ShardWriter`` (``maxcount`` samples or ``maxsize`` bytes a shard). A
sample is ``<key>.<ext>``: the original file's bytes, not re-encoded (the pixels decode exactly
as from the folder); ``<key>.json``: {"path": its path relative to the folder}; in a labelled
folder also ``<key>.txt`` (its class name: the first-level sub-folder, the label
``data.source=shards`` reads) and ``<key>.cls`` (the class's index among the sorted names, for
other WebDataset tools). The key is the relative path without its extension, every character
outside ``[A-Za-z0-9_-]`` made ``_`` and ``/`` made ``__`` (a short hash of the path added when
two paths would give one key). Samples are written in the folder's listing order
(``list_image_folder``), so the shards read in pattern order list the same items in the same
order as the folder: the same val/test carve, the same training batches for a seed.

``--manifest data/03_primary/curated_manifest.csv`` writes only the manifest's ``item_id``s (the
curated set of that folder). Output is local; any fsspec URL reads the shards back.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dinoflow.data.image_folder import list_image_folder
from dinoflow.errors import DataError

_FIELD = re.compile(r"%0?(\d*)d")
MTIME = 0.0  # the same folder gives the same shard bytes


@dataclass
class ShardReport:
    """What ``write_shards`` wrote: the counts, the shard files and the ``data.path`` pattern."""

    n_images: int
    n_shards: int
    data_path: str
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0


def sample_key(relative: str, used: set[str]) -> str:
    """A WebDataset key for a relative path: stable, no dot or slash, unique within ``used``."""
    stem = relative.rsplit(".", 1)[0]
    key = "__".join(re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in stem.split("/"))
    if key in used:
        key = f"{key}_{hashlib.sha1(relative.encode()).hexdigest()[:8]}"
    used.add(key)
    return key


def brace_pattern(out: str, n_shards: int) -> str:
    """``shard-%06d.tar`` and 3 shards -> ``shard-{000000..000002}.tar`` (``data.path``)."""
    if n_shards == 1:
        return out % 0
    match = _FIELD.search(out)
    first, last = match.group(0) % 0, match.group(0) % (n_shards - 1)
    return f"{out[: match.start()]}{{{first}..{last}}}{out[match.end() :]}"


def _selected(root: Path, manifest: str | None) -> tuple[list[Path], list[str], list[str]]:
    """(paths, label names, class names) of the folder, or of its curated set."""
    paths, labels, class_names = list_image_folder(root)
    if manifest is not None:
        import pandas as pd

        wanted = set(pd.read_csv(manifest, dtype={"item_id": str})["item_id"])
        keep = [i for i, p in enumerate(paths) if p.relative_to(root).as_posix() in wanted]
        if not keep:
            raise DataError(f"--manifest {manifest}: none of its item_ids is an image under {root}")
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    if not paths:
        raise DataError(f"--from {root}: no images")
    return paths, labels, class_names


def _check_out(out: str, overwrite: bool) -> None:
    if not _FIELD.search(out):
        raise DataError(f"--out {out}: needs a shard number field such as shard-%06d.tar")
    existing = sorted(glob.glob(_FIELD.sub("[0-9]*", glob.escape(out))))
    if existing and not overwrite:
        raise DataError(
            f"--out {out}: {len(existing)} shard(s) already there ({existing[0]}, ...): "
            "pass --overwrite to replace them"
        )
    for old in existing:
        Path(old).unlink()
    Path(out).parent.mkdir(parents=True, exist_ok=True)


def _sample(root: Path, path: Path, label: str, index: dict[str, int], used: set[str]) -> dict:
    relative = path.relative_to(root).as_posix()
    sample = {
        "__key__": sample_key(relative, used),
        path.suffix.lower().lstrip("."): path.read_bytes(),
        "json": json.dumps({"path": relative}),
    }
    if label:
        sample.update(txt=label, cls=str(index[label]))
    return sample


def write_shards(
    root: str | Path,
    out: str,
    maxcount: int = 10000,
    maxsize: float = 1e9,
    manifest: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ShardReport:
    """The images of ``root`` (or the curated set ``manifest`` names) -> shards ``out``
    (``%06d`` the shard number); see the module docstring for the layout."""
    import webdataset as wds
    from tqdm.auto import tqdm

    root, t0 = Path(root), time.perf_counter()
    paths, labels, class_names = _selected(root, manifest)
    _check_out(out, overwrite)
    index = {name: i for i, name in enumerate(class_names)}
    written: list[str] = []
    used: set[str] = set()
    bar = tqdm(total=len(paths), desc="shards", unit="img", disable=not progress)
    with wds.ShardWriter(
        out, maxcount=maxcount, maxsize=maxsize, post=written.append, verbose=0, mtime=MTIME
    ) as writer:
        for path, label in zip(paths, labels, strict=True):
            try:
                writer.write(_sample(root, path, label, index, used))
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc}") from None
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - t0
    return ShardReport(len(paths), len(written), brace_pattern(out, len(written)), written, seconds)


def main(argv: list[str] | None = None) -> int:
    """``dinoflow-shards write --from DIR --out data/shards/shard-%06d.tar [...]``."""
    parser = argparse.ArgumentParser(prog="dinoflow-shards", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write shards from a folder or its curated set")
    write.add_argument("--from", dest="root", required=True, help="the folder of images")
    write.add_argument("--manifest", help="a curated_manifest.csv: only its item_ids")
    write.add_argument("--out", default="data/shards/shard-%06d.tar")
    write.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    write.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    write.add_argument("--overwrite", action="store_true", help="replace shards already there")
    write.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = write_shards(
            args.root,
            args.out,
            args.maxcount,
            args.maxsize,
            args.manifest,
            args.overwrite,
            not args.no_progress,
        )
    except DataError as exc:
        print(f"dinoflow-shards: {exc}", file=sys.stderr)
        return 2
    rate = report.n_images / max(report.seconds, 1e-9)
    print(
        f"{report.n_images} images in {report.n_shards} shard(s), {rate:.0f} images/s\n"
        f'train on them: kedro run --params "data.source=shards,data.path={report.data_path}"'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
