"""The default curation on Fashion-MNIST, end to end (slow: about a minute on 2 cores)."""

from __future__ import annotations

import time

import pytest

from dinoflow.curation import curation_config
from dinoflow.data import load_splits


@pytest.mark.slow
def test_fashion_mnist_default_curation(tmp_path, run_curation) -> None:
    try:
        splits = load_splits("fashion_mnist", None, 5000, 0.1, 0, allow_download=False)
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
    cfg = curation_config({"show_progress": False, "report": {"dir": str(tmp_path)},
                           "validation": {"docs_dir": str(tmp_path / "gx_docs")}})  # fmt: skip
    t0 = time.perf_counter()
    res = run_curation(splits, cfg.model_dump())
    assert time.perf_counter() - t0 < 300  # the budget on 2 cores
    r = res.report
    assert r["counts"]["input"] == {"train": 55000, "val": 5000, "test": 10000}
    assert len(res.manifest) == cfg.sampling.target_size == 50000
    assert res.manifest["item_id"].str.startswith("train/").all()
    assert set(res.manifest["item_id"]).isdisjoint(splits["val"].ids)
    # near duplicates of val/test exist in Fashion-MNIST: the report counts them per split
    assert r["removed_as_eval_duplicates"] > 0
    assert r["removed_as_eval_duplicates_by_split"].get("test", 0) > 0
    assert r["balance"]["after"]["gini"] < r["balance"]["before"]["gini"]
    assert (tmp_path / "gx_docs" / "index.html").is_file()
