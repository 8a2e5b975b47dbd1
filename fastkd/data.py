"""Datasets for distillation jobs: embedded or generated, never downloaded.

Every dataset is a function ``builder(options, seed) -> Dataset`` registered under a name with
:func:`register_dataset`; a job names it in ``[data] name``. Two are built in:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes), pixel
  values scaled to [0, 1], input shape ``(1, 8, 8)``;
- ``multiview``: the synthetic "multi-view" data model of Allen-Zhu & Li (ensemble distillation):
  ``classes`` classes, each with two orthogonal feature directions in R^dim; an input is
  ``patches`` patches of dimension ``dim``. Most samples show both features of their class in
  different patches, a ``single_view_fraction`` show only one (the other one weakly), features of
  other classes appear weakly in the remaining patches, plus Gaussian noise.

A name that is not registered but is a path to a ``.npz`` file holding arrays ``x`` ([N, ...]
float) and ``y`` ([N] int) loads that file: the way to bring a real dataset without code.

The builder returns the full data; :func:`load_dataset` makes the stratified train/validation/test
split and then applies the robustness injections to the *training* split only: a stratified
``fraction`` of it, class imbalance and label noise.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import numpy as np
import torch


class DataError(ValueError):
    """A dataset cannot be built from the given options (unknown name, missing file, bad array)."""


@dataclass
class Dataset:
    """Features ``x`` [N, D] float32 (flattened) and labels ``y`` [N] int64.

    ``input_shape`` is the shape of one sample before flattening (``(C, H, W)`` for images,
    ``(patches, dim)`` for multi-view data); ``num_classes`` the number of classes.
    """

    x: torch.Tensor
    y: torch.Tensor
    input_shape: Tuple[int, ...]
    num_classes: int


@dataclass
class Splits:
    """Train/validation/test splits of one dataset, plus what was injected into training."""

    train: Dataset
    val: Dataset
    test: Dataset
    name: str
    noisy_labels: int = 0  # how many training labels label-noise injection changed

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return self.train.input_shape

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


Builder = Callable[[dict, int], Dataset]
DATASETS: Dict[str, Builder] = {}


def register_dataset(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(options: dict, seed: int) -> Dataset`` under ``name``."""

    def deco(fn: Builder) -> Builder:
        DATASETS[name] = fn
        return fn

    return deco


@register_dataset("digits")
def digits(options: dict, seed: int) -> Dataset:
    """scikit-learn's bundled 8x8 digits, pixels scaled from [0, 16] to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    return Dataset(x, y, (1, 8, 8), 10)


MULTIVIEW_DEFAULTS = {
    "classes": 10,
    "dim": 32,
    "patches": 8,
    "samples": 3000,
    "single_view_fraction": 0.2,
    "noise": 0.15,
    "weak_view": 0.1,
    "off_class": 0.3,
}


@register_dataset("multiview")
def multiview(options: dict, seed: int) -> Dataset:
    """The multi-view data model (see the module docstring); ``options`` override
    :data:`MULTIVIEW_DEFAULTS`. Sample i of class c is ``patches x dim``:

    - view patches: ``P//4`` patches carry ``a * v[c, 0]`` and ``P//4`` others ``a * v[c, 1]``
      with ``a ~ U[0.5, 1.5]`` (multi-view); for single-view samples one view keeps that strength
      and the other is scaled by ``weak_view``;
    - every other patch carries ``b * v[c', l]`` for a random other class c' and view l,
      ``b ~ U[0, off_class]``;
    - every coordinate gets N(0, noise^2).

    The 2*classes directions ``v`` are orthonormal (QR of a Gaussian matrix), so dim >= 2*classes.
    """
    o = {**MULTIVIEW_DEFAULTS, **options}
    k, d, p, n = int(o["classes"]), int(o["dim"]), int(o["patches"]), int(o["samples"])
    if 2 * k > d:
        raise DataError(f"multiview: dim={d} must be at least 2*classes={2 * k} (orthogonal features)")
    if p < 2:
        raise DataError(f"multiview: patches={p} must be at least 2")
    rng = np.random.default_rng(seed + 7919)  # the data depend on the seed, not on the split
    q, _ = np.linalg.qr(rng.standard_normal((d, 2 * k)))
    v = q.T.reshape(k, 2, d)  # v[c, l] is feature l of class c
    y = rng.integers(0, k, size=n)
    single = rng.random(n) < float(o["single_view_fraction"])
    m = max(1, p // 4)
    x = rng.standard_normal((n, p, d)) * float(o["noise"])
    for i in range(n):
        order = rng.permutation(p)
        strengths = rng.uniform(0.5, 1.5, size=2)
        if single[i]:
            strengths[rng.integers(0, 2)] *= float(o["weak_view"])
        for view in range(2):
            x[i, order[view * m : (view + 1) * m]] += strengths[view] * v[y[i], view]
        for patch in order[2 * m :]:
            other = (y[i] + rng.integers(1, k)) % k
            x[i, patch] += rng.uniform(0, float(o["off_class"])) * v[other, rng.integers(0, 2)]
    return Dataset(torch.tensor(x.reshape(n, p * d), dtype=torch.float32), torch.tensor(y, dtype=torch.int64), (p, d), k)


def load_npz(path: str) -> Dataset:
    """A user dataset: ``.npz`` with ``x`` [N, ...] and integer ``y`` [N] (classes 0..C-1)."""
    try:
        with np.load(path) as f:
            if "x" not in f or "y" not in f:
                raise DataError(f"{path}: an .npz dataset needs arrays 'x' and 'y', found {sorted(f.files)}")
            x, y = np.asarray(f["x"], dtype=np.float32), np.asarray(f["y"])
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: cannot read the dataset ({exc})") from None
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"{path}: x must be [N, ...] and y [N] non-negative integers, got {x.shape} and {y.shape} {y.dtype}")
    shape = tuple(x.shape[1:])
    return Dataset(torch.from_numpy(x.reshape(len(x), -1)), torch.from_numpy(y.astype(np.int64)), shape, int(y.max()) + 1)


def build_dataset(name: str, options: dict, seed: int) -> Dataset:
    """The full dataset ``name`` (registered name or ``.npz`` path)."""
    if name in DATASETS:
        return DATASETS[name](options, seed)
    if name.endswith(".npz") or os.sep in name:
        if not os.path.isfile(name):
            raise DataError(f"dataset file not found: {name}")
        return load_npz(name)
    raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))} or a path to an .npz file")


# ----------------------------------------------------------------------------------------------
# Splitting and injections (training split only)
# ----------------------------------------------------------------------------------------------


def _subset(ds: Dataset, idx: np.ndarray) -> Dataset:
    idx_t = torch.as_tensor(np.sort(idx), dtype=torch.int64)
    return Dataset(ds.x[idx_t], ds.y[idx_t], ds.input_shape, ds.num_classes)


def stratified_fraction(ds: Dataset, fraction: float, rng: np.random.Generator) -> Dataset:
    """Keep ``fraction`` of each class (at least one sample per class present)."""
    if fraction >= 1.0:
        return ds
    y = ds.y.numpy()
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        keep.append(rng.permutation(members)[: max(1, int(round(fraction * len(members))))])
    return _subset(ds, np.concatenate(keep))


def imbalance(ds: Dataset, ratio: float, rng: np.random.Generator) -> Dataset:
    """Long-tailed class profile: class c keeps ``n_c = n_max * ratio ** (c / (C - 1))`` samples.

    ``ratio`` in (0, 1] is the smallest/largest class size; 1 leaves the data as it is.
    """
    if ratio >= 1.0:
        return ds
    y = ds.y.numpy()
    classes = ds.num_classes
    n_max = min(int((y == c).sum()) for c in range(classes) if (y == c).any())
    keep = []
    for c in range(classes):
        members = np.flatnonzero(y == c)
        n_c = max(1, int(math.floor(n_max * ratio ** (c / max(1, classes - 1)))))
        keep.append(rng.permutation(members)[:n_c])
    return _subset(ds, np.concatenate(keep))


def label_noise(ds: Dataset, fraction: float, rng: np.random.Generator) -> Tuple[Dataset, int]:
    """Symmetric label noise: a random ``fraction`` of labels is replaced by a *different* class
    drawn uniformly. Returns the noisy dataset and how many labels changed."""
    if fraction <= 0.0:
        return ds, 0
    n = len(ds.y)
    flip = rng.permutation(n)[: int(round(fraction * n))]
    y = ds.y.clone()
    shift = torch.as_tensor(rng.integers(1, ds.num_classes, size=len(flip)), dtype=torch.int64)
    y[torch.as_tensor(flip, dtype=torch.int64)] = (y[torch.as_tensor(flip, dtype=torch.int64)] + shift) % ds.num_classes
    return Dataset(ds.x, y, ds.input_shape, ds.num_classes), int(len(flip))


def load_dataset(
    name: str,
    options: dict | None = None,
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fraction: float = 1.0,
    imbalance_ratio: float = 1.0,
    noise: float = 0.0,
) -> Splits:
    """Build ``name``, split it stratified into train/val/test with ``seed``, then inject into the
    training split, in this order: keep a stratified ``fraction``, impose ``imbalance_ratio``,
    flip a ``noise`` fraction of labels. Validation and test stay clean and balanced."""
    from sklearn.model_selection import train_test_split

    full = build_dataset(name, options or {}, seed)
    idx = np.arange(len(full.y))
    y = full.y.numpy()
    try:
        rest, test_idx = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
        train_idx, val_idx = train_test_split(
            rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y[rest], random_state=seed + 1
        )
    except ValueError as exc:
        raise DataError(f"dataset {name!r} cannot be split stratified ({exc})") from None
    rng = np.random.default_rng(seed + 104729)
    train = stratified_fraction(_subset(full, train_idx), fraction, rng)
    train = imbalance(train, imbalance_ratio, rng)
    train, flipped = label_noise(train, noise, rng)
    return Splits(train, _subset(full, val_idx), _subset(full, test_idx), name, flipped)


# ----------------------------------------------------------------------------------------------
# Augmentation (training batches only; uses the global torch RNG, which checkpoints restore)
# ----------------------------------------------------------------------------------------------

AUGMENTATIONS = ("none", "shift", "noise")


def augment(x: torch.Tensor, kind: str, input_shape: Tuple[int, ...], strength: float = 1.0) -> torch.Tensor:
    """Augment a flat batch ``x`` [B, D] whose samples have ``input_shape``.

    - ``shift``: translate each image ``(C, H, W)`` by a random whole number of pixels in
      ``[-s, s]`` along each axis (``s = max(1, round(strength))``), filling with zeros;
    - ``noise``: add N(0, strength^2) to every feature;
    - ``none``: return ``x``.

    Distillation uses the *same* augmented batch for teachers and students, so the student is
    taught on inputs it never saw with a label (function matching).
    """
    if kind == "none":
        return x
    if kind == "noise":
        return x + strength * torch.randn_like(x)
    if kind != "shift":
        raise ValueError(f"unknown augmentation {kind!r}")
    if len(input_shape) != 3:
        raise ValueError(f"augmentation 'shift' needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
    c, h, w = input_shape
    s = max(1, int(round(strength)))
    img = torch.nn.functional.pad(x.view(-1, c, h, w), (s, s, s, s))
    b = img.shape[0]
    dy = torch.randint(0, 2 * s + 1, (b,))
    dx = torch.randint(0, 2 * s + 1, (b,))
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * s)
    img = img.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, c, h, w)
    return img.gather(3, cols).reshape(b, c * h * w)
