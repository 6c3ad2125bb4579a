"""The dedup graph (``curation.dedup``): similarity and Hamming edges, IVF search, components and
representatives."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dinoflow.curation import curation_config
from dinoflow.curation.dedup import (
    connected_components,
    exact_duplicates,
    hamming_edges,
    phash_bytes,
    representatives,
    similarity_edges,
)


def test_similarity_edges_match_direct_cosines() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    x[3] = x[0] + 0.01  # near duplicate of 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = curation_config({}).dedup
    i, j, s = similarity_edges(x, 0.99, 3, cfg)
    cos = x @ x.T
    expected = {(a, b) for a in range(6) for b in range(a + 1, 6) if cos[a, b] >= 0.99}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == expected == {(0, 3)}
    assert s[0] == pytest.approx(cos[0, 3], abs=1e-6)
    i, j, _ = similarity_edges(x[:3], 0.99, 1, cfg, base=x[3:])  # cross mode
    assert (i.tolist(), j.tolist()) == ([0], [0])


def test_ivf_search_finds_the_same_duplicates() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    x[1000:1010] = x[:10] + 0.001  # ten near copies
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = similarity_edges(x, 0.99, 4, curation_config({}).dedup)
    ivf_cfg = curation_config({"dedup": {"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 16}}).dedup
    ivf = similarity_edges(x, 0.99, 4, ivf_cfg)  # nprobe = nlist: exhaustive, so identical
    assert flat[0].tolist() == ivf[0].tolist() == list(range(10))
    assert flat[1].tolist() == ivf[1].tolist() == list(range(1000, 1010))


def test_hamming_edges_and_phash_bytes() -> None:
    import imagehash

    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8))
    h = imagehash.phash(img)
    assert np.unpackbits(phash_bytes([str(h)])[0]).astype(bool).tolist() == h.hash.flatten().tolist()
    codes = phash_bytes(["0000000000000000", "0000000000000003", "ffffffffffffffff"])
    i, j, d = hamming_edges(codes, 2, 2)  # distances: (0,1)=2, (0,2)=64, (1,2)=62
    assert (i.tolist(), j.tolist(), d.tolist()) == ([0], [1], [2])


def test_components_and_representatives() -> None:
    labels = connected_components(6, np.array([0, 1, 4]), np.array([1, 2, 5]))
    assert labels[0] == labels[1] == labels[2] and labels[4] == labels[5] and labels[3] not in labels[[0, 4]]
    keep = representatives(labels, np.array([0, -5, 0, 0, 3, 3]))
    assert keep.tolist() == [False, True, False, True, True, False]
    keep, twin = exact_duplicates(pd.Series(["x", "y", "x", "x"]), np.array([0, 0, -1, 0]))
    assert keep.tolist() == [False, True, True, False] and twin.tolist() == [2, 1, 2, 2]
