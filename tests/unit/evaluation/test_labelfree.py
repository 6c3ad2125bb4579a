"""Label-free metrics: hand-computed values on tiny tensors, the views, and real images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinoflow.data import Split
from dinoflow.evaluation.labelfree import (
    ViewSettings,
    alignment,
    held_out_indices,
    image_generator,
    label_free_metrics,
    rankme,
    two_views,
    uniformity,
    view_retrieval_top1,
)
from dinoflow.evaluation.metric_spec import (
    data_is_labelled,
    direction,
    labels_are_usable,
    out_of_range,
    splits_are_labelled,
)
from dinoflow.models.vit import DinoVisionTransformer


# ----------------------------------------------------------------------------- RankMe
def test_rankme_of_orthogonal_one_hot_embeddings_is_the_dimension():
    d = 4
    # sigma = (1, 1, 1, 1): p_k = 1/4 + 1e-7, rankme = exp(-4 p log p)
    p = 0.25 + 1e-7
    assert rankme(torch.eye(d)) == pytest.approx(math.exp(-4 * p * math.log(p)), rel=1e-12)
    assert rankme(torch.eye(d)) == pytest.approx(4.0, rel=1e-5)
    assert rankme(5.0 * torch.eye(d)[[2, 0, 3, 1]]) == pytest.approx(4.0, rel=1e-5)  # scale-free
    # one direction twice as often: sigma = (sqrt 2, 1, 1, 1), not uniform -> below 4
    p = torch.tensor([2**0.5, 1, 1, 1]) / (3 + 2**0.5)
    expected = math.exp(float(-(p * p.log()).sum()))
    assert rankme(torch.eye(d)[[0, 1, 2, 3, 0]]) == pytest.approx(expected, rel=1e-5)
    assert expected < 3.99


def test_rankme_of_known_singular_values():
    # sigma = (3, 1): p = (0.75, 0.25) -> exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    assert rankme(x) == pytest.approx(1.7548, abs=1e-4)
    assert rankme(x) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))),
                                      rel=1e-5)  # fmt: skip


def test_rankme_of_a_collapsed_set_is_one():
    line = torch.tensor([[1.0, 2.0, 3.0]]) * torch.arange(1, 6.0)[:, None]  # rank 1
    assert rankme(line) == pytest.approx(1.0, abs=1e-5)
    assert rankme(torch.zeros(5, 3)) == 1.0
    assert rankme(line) >= 1.0


# ----------------------------------------------------------------------------- alignment
def test_alignment_hand_values():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert alignment(x, x) == 0.0
    assert alignment(x, 3.0 * x) == pytest.approx(0.0, abs=1e-12)  # normalised first
    e1, e2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    assert alignment(e1, e2) == pytest.approx(2.0)  # orthogonal: |e1 - e2|^2 = 2
    assert alignment(e1, -e1) == pytest.approx(4.0)  # opposite
    # mean over rows: one identical pair (0), one orthogonal pair (2)
    assert alignment(torch.cat([e1, e1]), torch.cat([e1, e2])) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- uniformity
def test_uniformity_hand_values():
    # two orthogonal unit vectors: d^2 = 2, log exp(-2 * 2) = -4
    assert uniformity(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(-4.0)
    # 60 degrees apart: d^2 = 2 - 2 cos 60 = 1 -> -2
    c, s = math.cos(math.pi / 3), math.sin(math.pi / 3)
    assert uniformity(torch.tensor([[1.0, 0.0], [c, s]])) == pytest.approx(-2.0)
    # three points, two equal: pairs d^2 = 0, 2, 2 -> log((1 + 2 e^-4) / 3)
    three = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert uniformity(three) == pytest.approx(math.log((1 + 2 * math.exp(-4)) / 3))
    # all equal: every d^2 = 0 -> 0, the worst value
    assert uniformity(torch.ones(4, 3)) == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------- view retrieval
def test_view_retrieval_hand_values():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    assert view_retrieval_top1(x, x) == 1.0
    assert view_retrieval_top1(x, 2.0 * x, chunk=4) == 1.0  # cosine; chunks of queries
    e = torch.eye(3)
    # second views of images 0 and 1 swapped: only image 2 finds its own
    assert view_retrieval_top1(e, e[[1, 0, 2]]) == pytest.approx(1 / 3)
    # collapsed: every similarity ties, argmax -> index 0, only image 0 is right
    assert view_retrieval_top1(torch.ones(5, 2), torch.ones(5, 2)) == pytest.approx(1 / 5)


def test_directions_and_ranges():
    assert direction("alignment") == "lower" and direction("baseline_random_uniformity") == "lower"
    assert direction("view_retrieval_top1") == "higher" and direction("knn_top1") == "higher"
    assert direction("rankme") == "higher"
    good = {"rankme": 3.0, "alignment": 0.5, "uniformity": -1.0, "view_retrieval_top1": 0.2,
            "knn_top1": 0.9}  # fmt: skip
    assert out_of_range(good) == {}
    bad = {"rankme": 0.5, "uniformity": 0.1, "alignment": float("nan"), "linear_top1": 1.5}
    assert set(out_of_range(bad)) == set(bad)


# ----------------------------------------------------------------------------- the views
def test_views_are_a_function_of_seed_and_index():
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = ViewSettings().augmentation(28, [0.3], [0.35])
    a1, b1 = two_views([img], aug, [image_generator(0, 5)])
    a2, b2 = two_views([img], aug, [image_generator(0, 5)])
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert a1.shape == (1, 1, 28, 28) and a1.dtype == torch.uint8
    assert not torch.equal(a1, b1)  # two different views
    a3, _ = two_views([img], aug, [image_generator(0, 6)])
    a4, _ = two_views([img], aug, [image_generator(1, 5)])
    assert not torch.equal(a1, a3) and not torch.equal(a1, a4)
    # in a batch, an image gets the views it gets alone
    other = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8, generator=torch.Generator())
    a5, b5 = two_views([other, img], aug, [image_generator(0, 9), image_generator(0, 5)])
    assert torch.equal(a5[1:], a1) and torch.equal(b5[1:], b1)
    assert held_out_indices(10, None, 0).tolist() == list(range(10))
    sample = held_out_indices(100, 7, 0)
    assert len(sample) == 7 and sorted(sample.tolist()) == sample.tolist()
    assert np.array_equal(sample, held_out_indices(100, 7, 0))


def _tiny_vit(seed: int, zero_patch_embed: bool = False) -> DinoVisionTransformer:
    torch.manual_seed(seed)
    vit = DinoVisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1,
                                num_heads=2, layerscale_init=None)  # fmt: skip
    if zero_patch_embed:
        with torch.no_grad():  # every image -> the same tokens: a collapsed network
            vit.vit.patch_embed.proj.weight.zero_()
    return vit.eval()


def _grey_split(n: int, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 12, 12), dtype=np.uint8)
    return Split(ids=[f"x/{i}" for i in range(n)], labels=np.full(n, -1), class_names=[],
                 channels=1, images=images, name="test")  # fmt: skip


def test_same_seed_same_numbers_whatever_the_batch_size():
    split = _grey_split(40)
    nets = {"a": _tiny_vit(0), "collapsed": _tiny_vit(0, zero_patch_embed=True)}
    kwargs = dict(image_size=8, mean=[0.5], std=[0.25], max_images=30, progress=False)
    first = label_free_metrics(nets, split, seed=3, batch_size=7, **kwargs)
    again = label_free_metrics(nets, split, seed=3, batch_size=30, **kwargs)
    for name in nets:
        for key, value in first[name].items():
            assert again[name][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, key)
    other = label_free_metrics(nets, split, seed=4, batch_size=7, **kwargs)
    assert other["a"]["alignment"] != first["a"]["alignment"]  # other views
    # the collapsed network: views identical, all images on one point
    collapsed = first["collapsed"]
    assert collapsed["alignment"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["uniformity"] == pytest.approx(0.0, abs=1e-9)
    assert collapsed["rankme"] == pytest.approx(1.0, abs=1e-4)
    assert collapsed["view_retrieval_top1"] == pytest.approx(1 / 30)
    assert first["a"]["rankme"] > 2.0 and first["a"]["uniformity"] < -0.1


# ----------------------------------------------------------------------------- labelled or not
def test_labelled_means_every_item_and_two_classes(tmp_path):
    from PIL import Image

    from dinoflow.config import DataConfig

    assert labels_are_usable(np.array([0, 1, 1])) and not labels_are_usable(np.array([0, 0]))
    assert not labels_are_usable(np.array([0, 1, -1]))

    def folder(name: str, layout: dict[str, int]) -> str:
        root = tmp_path / name
        for sub, n in layout.items():
            (root / sub).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8), i * 20, np.uint8)).save(root / sub / f"{i}.png")
        return str(root)

    def labelled(path: str) -> bool:
        return data_is_labelled(DataConfig(source="image_folder", path=path))

    assert not labelled(folder("flat", {".": 4}))
    assert not labelled(folder("one_sub", {"cats": 4}))
    assert not labelled(folder("mixed", {"cats": 3, "dogs": 3, ".": 1}))  # one loose file
    assert labelled(folder("two_subs", {"cats": 3, "dogs": 3}))
    assert data_is_labelled(DataConfig())  # Fashion-MNIST

    def split(labels):
        return Split(ids=[str(i) for i in range(len(labels))], labels=np.array(labels),
                     class_names=[], channels=1)  # fmt: skip

    ok = {"train": split([0, 1]), "val": split([1]), "test": split([0])}
    assert splits_are_labelled(ok)
    assert not splits_are_labelled({**ok, "test": split([-1])})
    assert not splits_are_labelled({n: split([0]) for n in ("train", "val", "test")})


def test_eval_settings_name_bad_label_free_keys():
    from dinoflow.evaluation.report import EvalSettings

    with pytest.raises(ValueError, match="evaluation.labelfree_max_images"):
        EvalSettings(labelfree_max_images=1)
    with pytest.raises(ValueError, match=r"evaluation.views_\*.*blur kernel"):
        EvalSettings(views_blur_kernel=4)
    with pytest.raises(ValueError, match=r"evaluation.views_\*.*global_scale"):
        EvalSettings(views_scale=(0.5, 1.5))
    assert EvalSettings().view_settings() == ViewSettings()
