"""Tar shards in the WebDataset layout, read by index: the listing of ``data.source=shards``.

A shard is an uncompressed tar whose members are ``<key>.<ext>``, grouped by key as WebDataset
groups them (the key is the member name up to the first dot of its base name). A sample's image
is its first member of ``IMAGE_EXTS``; its label the class name in ``<key>.txt`` (or the
``"label"`` of ``<key>.json``), else the integer in ``<key>.cls``, else none. ``data.path`` is
one shard, or a brace pattern (``/data/shard-{000000..000099}.tar``, several joined by ``::``:
webdataset's own expansion), of local paths or fsspec URLs.

Training needs random access by index (an exact resumption replays the same seeded index order),
which WebDataset's streaming pipeline does not give. So the headers of each shard are scanned once
(Python's ``tarfile``; remembered per process while the shard's size and mtime stay the same) into
``ShardMembers`` (shard, member, data offset, size), and item i is a range read of exactly those
bytes (``fs.cat_file``: a seek and a read for a local file, a range request for a URL), decoded
by the one decoder (``dinoflow.data.decode``).
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass

import numpy as np

from dinoflow.errors import DataError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
LABEL_EXTS = ("txt", "json", "cls")


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its image member and its label (class name or integer) if any."""

    key: str
    member: str
    offset: int
    size: int
    label: str | None = None  # a class name (.txt / .json)
    cls: int | None = None  # an integer label (.cls)


def shard_urls(pattern: str | None) -> list[str]:
    """``data.path`` -> the shards' paths or URLs, in order (webdataset's brace expansion)."""
    from webdataset.shardlists import expand_urls

    if not pattern:
        raise DataError("data.path: required with data.source=shards (e.g. shard-{000..009}.tar)")
    if pattern.count("{") != pattern.count("}"):
        raise DataError(f"data.path: unbalanced braces in the shard pattern {pattern!r}")
    urls = expand_urls(pattern)
    bad = [u for u in urls if "{" in u or "}" in u or not u]
    if bad or not urls:
        raise DataError(
            f"data.path: {pattern!r} is not a shard pattern webdataset expands (e.g. "
            f"/data/shard-{{000000..000099}}.tar): {bad[0] if bad else 'nothing'} is left"
        )
    return urls


def _fs(url: str):
    """(filesystem, path) of a local path, a ``file://`` or any other fsspec URL. Not cached
    here: fsspec caches its instances per process, and a remote one must not cross a fork into
    the loader's workers."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def _split_name(name: str) -> tuple[str, str] | None:
    """Member name -> (key, ext) as WebDataset splits it (the first dot of the base name)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label_of(ext: str, raw: bytes) -> tuple[str | None, int | None]:
    text = raw.decode("utf-8", errors="replace").strip()
    if ext == "txt":
        return text or None, None
    if ext == "json":
        try:
            value = json.loads(text).get("label") if text.startswith("{") else None
        except ValueError:
            value = None
        return (str(value) if value not in (None, "") else None), None
    try:
        return None, int(text)
    except ValueError:
        return None, None


def _group(tar: tarfile.TarFile) -> list[ShardSample]:
    """The samples of an open tar, in the order their keys first appear."""
    images: dict[str, dict[str, tarfile.TarInfo]] = {}
    labels: dict[str, dict[str, tuple[str | None, int | None]]] = {}
    for info in tar:
        parts = _split_name(info.name) if info.isfile() else None
        if parts is None:
            continue
        key, ext = parts
        members = images.setdefault(key, {})
        if ext in IMAGE_EXTS:
            members.setdefault(ext, info)
        elif ext in LABEL_EXTS:
            labels.setdefault(key, {})[ext] = _label_of(ext, tar.extractfile(info).read())
    samples = []
    for key, members in images.items():
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            continue
        found = labels.get(key, {})
        name = next((found[e][0] for e in ("txt", "json") if e in found and found[e][0]), None)
        cls = found.get("cls", (None, None))[1]
        info = members[ext]
        samples.append(ShardSample(key, info.name, info.offset_data, info.size, name, cls))
    return samples


_SCANNED: dict[tuple[str, str], list[ShardSample]] = {}


def _stamp(info: dict) -> str:
    """What says a shard changed: its size and modification time (object stores: ETag)."""
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


def scan_shard(url: str, info: dict) -> list[ShardSample]:
    """The samples of one shard (its tar headers and label members read, no image decoded);
    ``info``: its fsspec ``info``. Scanned once per process while the shard is unchanged."""
    key = (url, _stamp(info))
    if key in _SCANNED:
        return _SCANNED[key]
    fs, path = _fs(url)
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            samples = _group(tar)
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise DataError(
            f"data.path: cannot read shard {url}: {type(exc).__name__}: {exc}"
        ) from None
    _SCANNED[key] = samples
    return samples


def scan_shards(pattern: str | None) -> list[tuple[str, str, list[ShardSample]]]:
    """Every shard of ``data.path`` as (url, stamp, samples), in pattern order (one stat per
    shard); one ``DataError`` naming ``data.path`` and the missing shards when some are not
    there."""
    urls = shard_urls(pattern)
    infos, missing = {}, []
    for url in urls:
        fs, path = _fs(url)
        try:
            infos[url] = fs.info(path)
        except FileNotFoundError:
            missing.append(url)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"data.path: {len(missing)} of the {len(urls)} shards of {pattern!r} not found: "
            f"{', '.join(missing[:5])}{more}"
        )
    return [(url, _stamp(infos[url]), scan_shard(url, infos[url])) for url in urls]


class ShardMembers:
    """Random access to the image members of a split: ``read(i)`` -> the member's bytes (a range
    read), ``name(i)`` -> ``<shard>#<member>`` (errors, curation's table); picklable."""

    def __init__(
        self,
        urls: list[str],
        stamps: list[str],
        shard: np.ndarray,
        members: list[str],
        offset,
        size,
    ):
        self.urls, self.stamps, self.members = urls, stamps, members  # stamps: per shard, listed
        self.shard = np.asarray(shard, dtype=np.int64)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.size = np.asarray(size, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        return f"{self.urls[self.shard[i]]}#{self.members[i]}"

    def identity(self, i: int) -> str:
        """The member and its shard as listed (size, modification time): a changed shard
        changes it."""
        stamp = self.stamps[self.shard[i]]
        return f"{self.name(i)}@{int(self.offset[i])}+{int(self.size[i])}|{stamp}"

    def read(self, i: int) -> bytes:
        """The bytes of member i; a ``DataError`` naming it when the shard cannot give them."""
        fs, path = _fs(self.urls[self.shard[i]])
        start, size = int(self.offset[i]), int(self.size[i])
        try:
            data = fs.cat_file(path, start=start, end=start + size)
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read image {self.name(i)}: unreadable ({type(exc).__name__}: {exc})"
            ) from None
        if len(data) != size:
            raise DataError(
                f"cannot read image {self.name(i)}: unreadable (shard truncated: "
                f"{len(data)} of {size} bytes)"
            )
        return data

    def subset(self, indices: np.ndarray) -> ShardMembers:
        indices = np.asarray(indices, dtype=np.int64)
        return ShardMembers(
            self.urls,
            self.stamps,
            self.shard[indices],
            [self.members[i] for i in indices],
            self.offset[indices],
            self.size[indices],
        )


@dataclass
class ShardListing:
    """Every sample of ``data.path``: ids ``<shard name>/<key>`` (``_shard_names``), label names (or ""),
    the sorted class names and the members to read."""

    ids: list[str]
    label_names: list[str]
    class_names: list[str]
    members: ShardMembers

    @property
    def labelled(self) -> bool:
        return bool(self.ids) and all(self.label_names) and len(self.class_names) >= 2


def list_shards(pattern: str | None) -> ShardListing:
    """``data.path`` -> its ``ShardListing``. Labels: the class names when any sample has one
    (sorted, as image_folder's sub-folders), else the ``.cls`` integers (as text, sorted by value)."""
    scanned = scan_shards(pattern)
    samples = [(u, s) for u, (_, _, found) in enumerate(scanned) for s in found]
    if not samples:
        raise DataError(f"data.path: no images in the {len(scanned)} shard(s) of {pattern!r}")
    named = any(s.label is not None for _, s in samples)
    if named:
        label_names = [s.label or "" for _, s in samples]
        class_names = sorted({n for n in label_names if n})
    else:
        label_names = ["" if s.cls is None else str(s.cls) for _, s in samples]
        class_names = [str(c) for c in sorted({s.cls for _, s in samples if s.cls is not None})]
    urls = [url for url, _, _ in scanned]
    members = ShardMembers(
        urls,
        [stamp for _, stamp, _ in scanned],
        np.array([u for u, _ in samples]),
        [s.member for _, s in samples],
        [s.offset for _, s in samples],
        [s.size for _, s in samples],
    )
    names = _shard_names(urls)
    ids = [f"{names[u]}/{s.key}" for u, s in samples]
    return ShardListing(ids, label_names, class_names, members)


def _shard_names(urls: list[str]) -> list[str]:
    """Each shard's path below the folder all of them share: the file name when they lie in one
    folder, ``a/shard-0.tar`` and ``b/shard-0.tar`` when two folders hold same-named shards."""
    parts = [u.rstrip("/").split("/") for u in urls]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ["/".join(p[common:]) for p in parts]
