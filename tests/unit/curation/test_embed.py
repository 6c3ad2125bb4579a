"""Embedders: pixels + PCA, a dinoflow backbone file (a trained teacher), a timm local file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinoflow.curation.config import EmbeddingConfig
from dinoflow.curation.embed import model_embeddings, pca_fit, pixel_embeddings


def _images(n: int = 5, size: int = 20) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8) for _ in range(n)]


def _direct(model: torch.nn.Module, rgb: np.ndarray, size: int, mean, std) -> np.ndarray:
    """The embedder's preprocessing written out for one image (RGB models): the uint8 image's
    shorter side resized to round(size / 0.875) (antialiased bilinear), the centre size x size
    kept (as every dinoflow consumer), then scaled and normalised."""
    from torchvision.transforms.v2 import functional as TF

    x = TF.resize(torch.from_numpy(rgb).permute(2, 0, 1)[None], round(size / 0.875), antialias=True)
    top, left = round((x.shape[2] - size) / 2), round((x.shape[3] - size) / 2)
    x = x[:, :, top : top + size, left : left + size].float() / 255.0
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        f = model(x)[0].numpy()
    return f / np.linalg.norm(f)


def test_pca_matches_svd() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 1.0, 0.5, 0.1])
    mean, comps = pca_fit(x, 2)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert np.allclose(np.abs(comps.T @ vt[:2].T), np.eye(2), atol=1e-6)
    thumbs = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    use = np.ones(30, bool)
    use[0] = False
    emb = pixel_embeddings(thumbs, np.ones(30, bool), use, 8, 100, 0)
    assert emb.shape == (30, 8) and np.allclose(np.linalg.norm(emb[1:], axis=1), 1, atol=1e-5)
    assert not emb[0].any()


def test_dinoflow_checkpoint_embedder(tmp_path) -> None:
    vit = pytest.importorskip("dinoflow.models.vit")
    torch.manual_seed(0)
    model = vit.DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    vit.save_backbone(model, tmp_path / "teacher.pt")
    imgs = _images()
    cfg = EmbeddingConfig(kind="dinoflow", checkpoint=str(tmp_path / "teacher.pt"), image_size=32,
                          batch_size=2, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])  # fmt: skip
    rows = np.array([0, 2, 3])
    emb = model_embeddings(cfg, lambda r: imgs[r], rows, 5, lambda: ([0.0] * 3, [1.0] * 3), progress=False)
    assert emb.shape == (5, 32) and not emb[1].any() and not emb[4].any()
    model.eval()
    for r in rows:
        assert np.allclose(emb[r], _direct(model, imgs[r], 32, [0.5] * 3, [0.25] * 3), atol=1e-5)


def test_timm_local_weights_embedder(tmp_path) -> None:
    import timm

    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2}
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **kwargs)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    imgs = _images(3)
    cfg = EmbeddingConfig(kind="timm", timm_name="vit_tiny_patch16_224", timm_weights=str(tmp_path / "w.pth"),
                          timm_kwargs=kwargs, image_size=32, batch_size=4)  # fmt: skip
    emb = model_embeddings(cfg, lambda r: imgs[r], np.arange(3), 3, lambda: ([0.0] * 3, [1.0] * 3), progress=False)
    model.eval()
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    assert np.allclose(emb[1], _direct(model, imgs[1], 32, mean, std), atol=1e-5)
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    bad = cfg.model_copy(update={"timm_weights": str(tmp_path / "bad.pth")})
    with pytest.raises(ValueError, match="lacks"):
        model_embeddings(bad, lambda r: imgs[r], np.arange(1), 1, lambda: ([0.0] * 3, [1.0] * 3), progress=False)


def test_embeddings_take_the_precision_rule_of_training(tmp_path, monkeypatch) -> None:
    """``curation.embedding.precision``: bf16 embeddings point where the fp32 ones do (cosine >
    0.99); ``auto`` follows dinoflow.precision for a batch's shapes (fp32 for this tiny model, and
    fp32 on a CPU without bf16 units whatever the shapes)."""
    from dinoflow import precision as prec
    from dinoflow.curation.embed import embedding_precision
    from dinoflow.models.vit import DinoVisionTransformer, save_backbone

    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    save_backbone(model, tmp_path / "teacher.pt")
    imgs = _images()
    cfg = EmbeddingConfig(kind="dinoflow", checkpoint=str(tmp_path / "teacher.pt"), image_size=32,
                          batch_size=4, mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    rows = np.arange(len(imgs))
    fp32 = model_embeddings(cfg.model_copy(update={"precision": "fp32"}), lambda r: imgs[r], rows,
                            len(imgs), lambda: ([0.0] * 3, [1.0] * 3), progress=False)  # fmt: skip
    bf16 = model_embeddings(cfg.model_copy(update={"precision": "bf16"}), lambda r: imgs[r], rows,
                            len(imgs), lambda: ([0.0] * 3, [1.0] * 3), progress=False)  # fmt: skip
    assert not np.array_equal(fp32, bf16)  # bf16 did run
    assert (fp32 * bf16).sum(axis=1).min() > 0.99
    assert embedding_precision(cfg, model, torch.device("cpu"))[0] == "fp32"  # 68 x 32 @ 32 x 128
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: False)
    big = cfg.model_copy(update={"batch_size": 4096, "image_size": 224})
    assert embedding_precision(big, model, torch.device("cpu"))[0] == "fp32"
    monkeypatch.setattr(prec, "cpu_bf16_units", lambda: True)
    wide = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=512, depth=1, num_heads=2)
    assert embedding_precision(big, wide, torch.device("cpu"))[0] == "bf16"


def test_pixel_embeddings_stream_a_memmap_to_the_in_memory_result(tmp_path, monkeypatch) -> None:
    """Memory-mapped thumbnails, read a block at a time (blocks of 7 here), with the PCA fitted on
    a subsample: exactly the all-in-memory computation; the dataset mean/std likewise."""
    import sys

    from dinoflow.curation.embed import l2_normalise, thumbnail_mean_std

    rng = np.random.default_rng(1)
    thumbs = np.lib.format.open_memmap(tmp_path / "t.npy", "w+", np.uint8, (50, 4, 4, 3))
    thumbs[:] = rng.integers(0, 256, thumbs.shape, dtype=np.uint8)
    fit, use = rng.random(50) < 0.8, rng.random(50) < 0.9
    monkeypatch.setattr(sys.modules["dinoflow.curation.embed"], "BLOCK", 7)  # not the step
    got = pixel_embeddings(thumbs, fit, use, 6, 20, 3)
    flat = np.asarray(thumbs).reshape(50, -1).astype(np.float32) / 255.0  # the whole array at once
    mean, comps = pca_fit(flat[fit], 6, 20, 3)
    # the blocked fit is the one-matrix PCA of the same sample to float rounding
    sample = flat[fit][np.sort(np.random.default_rng(3).choice(int(fit.sum()), 20, replace=False))]
    whole = np.cov(sample.astype(np.float64), rowvar=False)
    top = np.linalg.eigh(whole)[1][:, ::-1][:, :6]
    np.testing.assert_allclose(mean, sample.mean(0, dtype=np.float64), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.abs((top * comps).sum(0)), 1.0, atol=1e-4)
    want = np.zeros((50, 6), np.float32)
    want[use] = ((flat[use] - mean) @ comps).astype(np.float32)
    np.testing.assert_array_equal(got, l2_normalise(want))
    m, s = thumbnail_mean_std(thumbs, fit)
    x = np.asarray(thumbs)[fit].reshape(-1, 3).astype(np.float64) / 255.0
    np.testing.assert_allclose(m, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s, x.std(0), rtol=1e-9)
    assert thumbnail_mean_std(thumbs, np.zeros(50, bool)) == ([0.0] * 3, [1e-3] * 3)
