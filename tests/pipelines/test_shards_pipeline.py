"""The curation pipeline on tar shards (``data.source=shards``): its node lists the shards, every
image is decoded from its member, and a member that does not decode is quarantined as unreadable
with ``<shard>#<member>`` as its path."""

from __future__ import annotations

import tarfile

from dinoflow.curation import curation_config
from dinoflow.data.shard_writer import write_shards
from dinoflow.data.shards import shard_urls
from dinoflow.pipelines.curation.nodes import load_curation_splits


def test_curation_runs_on_shards_and_quarantines_a_broken_member(
    tmp_path, real_photo, run_curation
) -> None:
    folder = tmp_path / "photos"
    for c, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(12):
            real_photo(48 + 5 * i + c, 40 + 3 * i).save(folder / name / f"p{i:02d}.jpg")
    report = write_shards(folder, str(tmp_path / "shards" / "s-%03d.tar"), maxcount=8,
                          progress=False)  # fmt: skip
    broken = shard_urls(report.data_path)[1]
    with tarfile.open(broken) as tar:
        info = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    with open(broken, "r+b") as f:
        f.seek(info.offset_data)
        f.write(b"\0" * info.size)
    data = {"source": "shards", "path": report.data_path, "val_size": 0.2, "test_fraction": 0.2}
    splits = load_curation_splits(data)
    assert sum(len(s) for s in splits.values()) == 24 and splits["train"].extra["root"] is None
    params = curation_config({
        "show_progress": False,
        "validation": {"docs_dir": str(tmp_path / "report" / "gx_docs")},
        "sampling": {"target_size": 1000, "n_clusters": [2, 1], "resampling_steps": [0, 1]},
        "report": {"dir": str(tmp_path / "report")},
    }).model_dump()  # fmt: skip
    res = run_curation(splits, params)
    key = f"s-001.tar/{info.name.split('.')[0]}"
    q = res.quarantine.set_index("item_id")
    assert q.loc[key, "reason"] == "unreadable" and q.loc[key, "path"] == f"{broken}#{info.name}"
    assert key not in set(res.manifest["item_id"])
    assert len(res.manifest) > 0 and all(i.startswith("s-00") for i in res.manifest["item_id"])
