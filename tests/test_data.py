"""fastkd.data: the embedded datasets, splits, injections and augmentation."""

import numpy as np
import pytest
import torch

from fastkd import data


def test_digits_split_is_stratified_and_disjoint():
    s = data.load_dataset("digits", seed=0, val_fraction=0.2, test_fraction=0.3)
    n = len(s.train.y) + len(s.val.y) + len(s.test.y)
    assert n == 1797 and s.num_classes == 10 and s.input_shape == (1, 8, 8)
    assert abs(len(s.test.y) - 0.3 * 1797) <= 1 and abs(len(s.val.y) - 0.2 * 1797) <= 1
    for part in (s.train, s.val, s.test):
        share = torch.bincount(part.y, minlength=10).double() / len(part.y)
        assert (share - 0.1).abs().max() < 0.02  # every class near 10% in every split
    rows = {tuple(r.tolist()) for r in torch.cat([s.train.x, s.val.x, s.test.x])}
    assert len(rows) > 1700  # (digits holds a few duplicate images)
    assert float(s.train.x.min()) >= 0 and float(s.train.x.max()) <= 1


def test_split_depends_on_seed_only():
    a, b = data.load_dataset("digits", seed=3), data.load_dataset("digits", seed=3)
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    c = data.load_dataset("digits", seed=4)
    assert not torch.equal(a.train.x, c.train.x)


def test_multiview_structure():
    opts = {"classes": 4, "dim": 16, "patches": 8, "samples": 400, "noise": 0.0, "off_class": 0.0,
            "single_view_fraction": 0.25, "weak_view": 0.1}
    ds = data.build_dataset("multiview", opts, seed=0)
    assert ds.x.shape == (400, 8 * 16) and ds.input_shape == (8, 16) and ds.num_classes == 4
    x = ds.x.view(400, 8, 16)
    norms = x.norm(dim=-1)
    # Without noise and off-class features, exactly 2*(P//4) = 4 patches carry the class features.
    assert ((norms > 0).sum(-1) == 4).all()
    # Single-view samples: one view at weak strength, so their weakest patch is < 0.15.
    single = (norms.clamp_min(1e-9).where(norms > 0, torch.tensor(9.0)).min(-1).values < 0.16).float().mean()
    assert 0.15 < float(single) < 0.35
    # Patches of one class lie in the span of that class's two directions: rank 2 per class.
    for c in range(4):
        patches = x[ds.y == c].reshape(-1, 16)
        sv = torch.linalg.svdvals(patches[patches.norm(dim=-1) > 0])
        assert sv[2] < 1e-4 * sv[0]


def test_multiview_rejects_too_small_dimension():
    with pytest.raises(data.DataError, match="dim"):
        data.build_dataset("multiview", {"classes": 10, "dim": 8}, seed=0)


def test_label_noise_flips_the_requested_fraction_to_other_classes():
    clean = data.load_dataset("digits", seed=0)
    noisy = data.load_dataset("digits", seed=0, noise=0.3)
    changed = (clean.train.y != noisy.train.y).sum().item()
    assert changed == noisy.noisy_labels == round(0.3 * len(clean.train.y))
    assert torch.equal(clean.test.y, noisy.test.y)  # evaluation stays clean


def test_imbalance_profile():
    s = data.load_dataset("digits", seed=0, imbalance_ratio=0.1)
    counts = torch.bincount(s.train.y, minlength=10).tolist()
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] / counts[0] == pytest.approx(0.1, abs=0.03)
    assert len(s.test.y) == len(data.load_dataset("digits", seed=0).test.y)


def test_fraction_keeps_each_class():
    s = data.load_dataset("digits", seed=0, fraction=0.25)
    full = data.load_dataset("digits", seed=0)
    assert abs(len(s.train.y) - 0.25 * len(full.train.y)) <= 10
    assert torch.bincount(s.train.y, minlength=10).min() > 0


def test_shift_augmentation_translates_with_zero_fill():
    torch.manual_seed(0)
    img = torch.zeros(1, 1, 4, 4)
    img[0, 0, 1, 2] = 1.0
    outs = {tuple(data.augment(img.view(1, 16), "shift", (1, 4, 4)).view(4, 4).nonzero()[0].tolist()) for _ in range(60)}
    assert outs == {(r, c) for r in (0, 1, 2) for c in (1, 2, 3)}  # every shift of at most one pixel
    x = torch.rand(5, 64)
    assert torch.equal(data.augment(x, "none", (1, 8, 8)), x)
    with pytest.raises(ValueError, match="image"):
        data.augment(torch.rand(2, 6), "shift", (6,))


def test_npz_dataset(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x=rng.standard_normal((120, 3, 2)).astype(np.float32), y=np.repeat(np.arange(3), 40))
    s = data.load_dataset(str(path), seed=0)
    assert s.input_shape == (3, 2) and s.num_classes == 3
    assert len(s.train.y) + len(s.val.y) + len(s.test.y) == 120
    with pytest.raises(data.DataError, match="not found"):
        data.build_dataset(str(tmp_path / "missing.npz"), {}, 0)
    with pytest.raises(data.DataError, match="unknown dataset"):
        data.build_dataset("cifar10", {}, 0)


def test_register_dataset():
    @data.register_dataset("tiny_test_ds")
    def tiny(options, seed):
        g = torch.Generator().manual_seed(seed)
        return data.Dataset(torch.randn(60, 4, generator=g), torch.arange(60) % 2, (4,), 2)

    try:
        s = data.load_dataset("tiny_test_ds", seed=1)
        assert s.num_classes == 2 and s.train.x.shape[1] == 4
    finally:
        del data.DATASETS["tiny_test_ds"]
