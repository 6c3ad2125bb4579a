"""Tar shards (``dinoflow.data.shards``, ``dinoflow.data.sources.shards``, the writer
``dinoflow.data.shard_writer``): a labelled folder of real photos written to shards reads back as
the same items, labels and pixels, the same training batches for a seed, and resumes exactly.

Order: the writer writes in the folder's listing order and the shards are read in pattern order,
so item i of the shards is item i of the folder (ids differ: ``shard-000001.tar/cat__p03`` for
``cat/p03.jpg``); every split is carved by position, so the splits match row for row.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoflow.config import DataConfig, ImageCacheConfig, PretrainConfig
from dinoflow.data import get_source, load_data
from dinoflow.data.decode import decode_image
from dinoflow.data.shard_writer import brace_pattern, main, sample_key, write_shards
from dinoflow.data.shards import list_shards, shard_urls
from dinoflow.errors import DataError

CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, real_photo) -> Path:
    """24 real photos in 3 class sub-folders: JPEGs (two of them large, for reduced decoding),
    a PNG per class, and a name with a dot and a space."""
    root = tmp_path_factory.mktemp("photos")
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(8):
            w, h = (96, 80) if i == 0 else (40 + 3 * i + c, 32 + 2 * i)
            im = real_photo(w, h).rotate(90 * c)
            ext = "png" if i == 7 else "jpg"
            im.save(root / name / (f"p{i:02d}.{ext}" if i != 6 else f"a b.{i}.{ext}"))
    return root


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "shard-%06d.tar"
    report = write_shards(folder, str(out), maxcount=10, progress=False)
    assert (report.n_images, report.n_shards) == (24, 3)
    assert report.data_path == str(out).replace("%06d", "{000000..000002}")
    return report.data_path


def _data(source: str, path, **more) -> DataConfig:
    return DataConfig(source=source, path=str(path), **{"val_size": 0.2, "test_fraction": 0.2, **more})


def test_shards_read_back_as_the_folder_items_labels_and_pixels(folder, shards) -> None:
    got, want = load_data(_data("shards", shards)), load_data(_data("image_folder", folder))
    for name in ("train", "val", "test"):
        s, f = got[name], want[name]
        assert len(s) == len(f) > 0 and s.class_names == f.class_names == list(CLASSES)
        assert s.labels.tolist() == f.labels.tolist()
        keys = [i.split("/", 1)[1] for i in s.ids]
        assert keys == [sample_key(i, set()) for i in f.ids]  # e.g. cat__a_b_6
        assert all(s.location(i).split(".tar#")[1].split(".")[0] == k for i, k in enumerate(keys))
        for i in range(len(s)):
            assert torch.equal(s.load(i), f.load(i)), s.ids[i]
    assert get_source("shards").is_labelled(_data("shards", shards))


def test_reduced_decoding_and_file_urls_give_the_same_pixels(folder, shards) -> None:
    cache = ImageCacheConfig(short_side=32)
    reduced = load_data(_data("shards", shards, cache=cache))["train"]
    plain = load_data(_data("image_folder", folder))["train"]
    assert reduced.short_side == 32
    big = [i for i in range(len(plain)) if "p00" in plain.ids[i]]
    assert big
    for i in big:  # 96x80 JPEGs: decoded at reduced scale, shorter side 32
        want = decode_image(plain.paths[i], 3, short_side=32)
        assert want.shape[1:] == (32, 38) and torch.equal(reduced.load(i), want)
    urls = load_data(_data("shards", "file://" + shards))["train"]
    assert urls.ids == reduced.ids and torch.equal(urls.load(3), plain.load(3))


def _tiny(run_dir: Path) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "crops": {"global_size": 16, "local_size": 8, "n_local": 1},
        "backbone": {"arch": "custom", "patch_size": 4, "embed_dim": 16, "depth": 1,
                     "num_heads": 2, "drop_path_rate": 0.1},
        "head": {"n_prototypes": 16, "hidden_dim": 16, "bottleneck_dim": 8},
        "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "device": "cpu",
                  "run_dir": str(run_dir), "checkpoint_every_steps": 1, "log_every_steps": 1,
                  "num_workers": 0, "progress": False, "precision": "fp32"},
    })  # fmt: skip


def test_training_batches_equal_the_folders_for_the_same_seed(folder, shards, tmp_path) -> None:
    from dinoflow.training.data import build_loader

    cfg, mean, std = _tiny(tmp_path), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    batches = []
    for data in (_data("shards", shards), _data("image_folder", folder)):
        train = load_data(data)["train"]
        loader = build_loader(cfg, train, mean, std, 0, 1, 0, 4, torch.device("cpu"))
        batches.append(list(loader))
    assert len(batches[0]) == len(batches[1]) == 4
    for a, b in zip(*batches, strict=True):
        tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
        assert tensors
        for k in tensors:
            assert torch.equal(a[k], b[k]), k
        lists = [k for k, v in a.items() if isinstance(v, list) and v and torch.is_tensor(v[0])]
        for k in lists:
            assert all(torch.equal(x, y) for x, y in zip(a[k], b[k], strict=True)), k


def test_pretraining_on_shards_resumes_exactly(shards, tmp_path) -> None:
    from dinoflow.training import pretrain

    train = load_data(_data("shards", shards))["train"]
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    pretrain(_tiny(tmp_path / "ref"), train, mean, std)
    with pytest.raises(SystemExit, match="stopped after step 2"):
        pretrain(_tiny(tmp_path / "run"), train, mean, std, stop_after_steps=2)
    resumed = pretrain(_tiny(tmp_path / "run"), load_data(_data("shards", shards))["train"],
                       mean, std)
    assert resumed.resumed_from_step == 2

    def weights(run: str) -> dict:
        return torch.load(tmp_path / run / "teacher_backbone.pt", weights_only=True)["state_dict"]

    ref, got = weights("ref"), weights("run")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_an_unreadable_member_is_replaced_and_counted_as_a_broken_file(shards, tmp_path) -> None:
    from dinoflow.curation.ingest import decode_item
    from dinoflow.training.data import MultiCropDataset

    copy = tmp_path / "shard-000000.tar"
    urls = shard_urls(shards)
    copy.write_bytes(Path(urls[0]).read_bytes())
    split = load_data(_data("shards", copy, val_size=2))["train"]
    with tarfile.open(copy) as tar:
        info = tar.getmember(split.members.members[1])
    with open(copy, "r+b") as f:  # the member's bytes overwritten: not an image any more
        f.seek(info.offset_data)
        f.write(b"\0" * info.size)
    with pytest.raises(DataError, match=f"{copy}#{info.name}"):
        split.load(1)
    image, unreadable = MultiCropDataset(split, seed=0).load(epoch=0, index=1)
    assert unreadable == [split.ids[1]] and image.shape[0] == 3
    assert decode_item(split, 1, 10**8).reason == "unreadable"
    assert split.location(1) == f"{copy}#{info.name}"


def test_several_patterns_and_bad_or_missing_shards(shards, tmp_path) -> None:
    urls = shard_urls(shards)
    assert len(urls) == 3 and urls[0].endswith("shard-000000.tar")
    joined = list_shards(f"{urls[2]}::{urls[0]}")  # webdataset's "::" joins patterns, in order
    assert len(joined.ids) == 4 + 10 and joined.ids[0].startswith("shard-000002.tar/")
    # the same shard name in two folders: ids keep the folder, so they stay unique
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "shard-000000.tar").write_bytes(Path(urls[0]).read_bytes())
    two = list_shards(f"{urls[0]}::{tmp_path / 'copy' / 'shard-000000.tar'}")
    assert len(set(two.ids)) == len(two.ids) == 20 and "/copy/shard-000000.tar/" in two.ids[-1]
    missing = shards.replace("000002}", "000004}")
    with pytest.raises(DataError, match=r"data.path: 2 of the 5 shards .* not found: .*000003"):
        list_shards(missing)
    with pytest.raises(DataError, match="data.path: unbalanced braces"):
        list_shards(shards.replace("}", ""))
    with pytest.raises(DataError, match="data.path: .* is not a shard pattern"):
        shard_urls("/data/shard-{}.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    with pytest.raises(DataError, match="data.path: cannot read shard .*junk.tar"):
        list_shards(str(tmp_path / "junk.tar"))
    with pytest.raises(ValueError, match="data.path is required with data.source=shards"):
        DataConfig(source="shards")


def test_cls_only_shards_from_other_tools_are_labelled_by_their_integers(real_photo, tmp_path):
    import io

    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "other.tar")) as writer:
        for i in range(6):
            buf = io.BytesIO()
            real_photo(20 + i, 20).save(buf, format="JPEG")
            writer.write({"__key__": f"s{i}", "jpeg": buf.getvalue(), "cls": str(7 * (i % 2))})
    listing = list_shards(str(tmp_path / "other.tar"))
    assert listing.class_names == ["0", "7"] and listing.label_names[:2] == ["0", "7"]
    assert listing.labelled


def test_the_command_writes_the_curated_set_and_refuses_to_overwrite(folder, tmp_path, capsys):
    manifest = tmp_path / "curated_manifest.csv"
    manifest.write_text("item_id,label,cluster\ncat/p01.jpg,0,0\nowl/p07.png,2,1\ndog/p03.jpg,1,0\n")
    out = str(tmp_path / "cur" / "shard-%04d.tar")
    args = ["write", "--from", str(folder), "--out", out, "--manifest", str(manifest),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 images in 1 shard(s)" in printed and f"data.path={out % 0}" in printed
    listing = list_shards(out % 0)
    assert [i.split("/", 1)[1] for i in listing.ids] == ["cat__p01", "dog__p03", "owl__p07"]
    assert listing.label_names == ["cat", "dog", "owl"]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_keys_and_patterns() -> None:
    used: set[str] = set()
    assert sample_key("cat/a b.6.jpg", used) == "cat__a_b_6"
    assert sample_key("cat/a b.6.png", used).startswith("cat__a_b_6_")  # unique
    assert brace_pattern("s/shard-%06d.tar", 12) == "s/shard-{000000..000011}.tar"
    assert brace_pattern("s/shard-%d.tar", 1) == "s/shard-0.tar"
    assert np.array_equal(shard_urls("a-{1..3}.tar"), ["a-1.tar", "a-2.tar", "a-3.tar"])


class _Pixels(torch.nn.Module):
    """A stand-in embedder: 8x8 resized pixels, flattened (what embed_image_set needs of one)."""

    in_chans, image_size, embed_dim = 3, 8, 192

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(x.float(), size=(8, 8), mode="area")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) * self.w


def test_embed_reads_shard_members_as_the_folder_files(folder, shards) -> None:
    from dinoflow.embeddings import embed_image_set, split_image_set

    model = _Pixels()
    got = split_image_set(load_data(_data("shards", shards))["train"], "curated:shards")
    want = split_image_set(load_data(_data("image_folder", folder))["train"], "curated:folder")
    assert got.images is not None and want.images is None and "#" in got.paths[0]
    a, kept_a, _ = embed_image_set(model, got, batch_size=4, progress=False)
    b, kept_b, _ = embed_image_set(model, want, batch_size=4, progress=False)
    assert kept_a == kept_b == list(range(len(got))) and np.array_equal(a, b)
