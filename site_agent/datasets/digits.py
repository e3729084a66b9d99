"""scikit-learn's bundled 8x8 digits, split across sites as the example apps expect.

Each site's data folder gets ``train.npz`` and ``test.npz`` with ``x`` (float32,
[N, 64], pixel values scaled to 0..1) and ``y`` (int64 labels 0-9). A held-out set,
drawn first and never given to a site, measures the global model. scikit-learn is
imported only here, when data is prepared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flare_provider.files import atomic_file

if TYPE_CHECKING:
    from ..trainer import DataSummary

NUM_CLASSES = 10
MIN_SITE_SAMPLES = 20


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits: ``x`` float32 [N, 64] in 0..1, ``y`` int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    return x, digits.target.astype(np.int64)


def _pool_and_holdout(seed: int, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices for the sites' pool and for the held-out set, fixed by ``seed``."""
    x, _ = load_digits_arrays()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(round(len(x) * holdout_fraction))
    return order[cut:], order[:cut]


def holdout_set(seed: int = 0, holdout_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """The shared held-out test set (the same for the same ``seed``), for the global model."""
    x, y = load_digits_arrays()
    _, holdout = _pool_and_holdout(seed, holdout_fraction)
    return x[holdout], y[holdout]


def _label_skew(labels: np.ndarray, num_sites: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions split per class by Dirichlet(alpha) proportions: small alpha, strong skew."""
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for label in range(NUM_CLASSES):
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_sites, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for site, chunk in enumerate(np.split(members, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= MIN_SITE_SAMPLES:
            return [rng.permutation(np.array(p)) for p in parts]
    raise ValueError(f"cannot give each of {num_sites} sites {MIN_SITE_SAMPLES} samples; use fewer sites or a larger alpha")


def _save_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    with atomic_file(path) as f:
        np.savez(f, x=x, y=y)


def write_site_partitions(
    site_data_dirs: Sequence[str | Path],
    non_iid: bool = True,
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    holdout_fraction: float = 0.2,
) -> dict[str, dict[str, object]]:
    """Split the digits (minus the held-out set) over the sites and write their files.

    ``non_iid`` skews each site's labels (Dirichlet ``alpha``); otherwise the split is
    uniform. Each site's share is split again into ``train.npz`` and ``test.npz``.
    Returns, per folder, the sample counts and label histogram of its training data.
    """
    if not site_data_dirs:
        raise ValueError("at least one site data folder is needed")
    x, y = load_digits_arrays()
    pool, _ = _pool_and_holdout(seed, holdout_fraction)
    rng = np.random.default_rng(seed + 1)
    if non_iid:
        positions = _label_skew(y[pool], len(site_data_dirs), alpha, rng)
    else:
        positions = np.array_split(rng.permutation(len(pool)), len(site_data_dirs))
    summary = {}
    for folder, chosen in zip(site_data_dirs, positions, strict=True):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        indices = pool[chosen]
        cut = max(1, int(round(len(indices) * test_fraction)))
        test, train = indices[:cut], indices[cut:]
        _save_npz(folder / "train.npz", x[train], y[train])
        _save_npz(folder / "test.npz", x[test], y[test])
        summary[str(folder)] = {
            "train": len(train),
            "test": len(test),
            "labels": np.bincount(y[train], minlength=NUM_CLASSES).tolist(),
        }
    return summary


def write_holdout(path: str | Path, seed: int = 0, holdout_fraction: float = 0.2) -> Path:
    """Write the held-out set as an ``.npz`` (``x``, ``y``) at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_npz(path, *holdout_set(seed, holdout_fraction))
    return path


def summarize_split(data_dir: str | Path, file_name: str = "train.npz") -> DataSummary:
    """A site's split as a ``describe`` task reports it: its size, and the layout of ``x`` and ``y``.

    The schema holds what must agree across sites for them to train one model (the
    feature shape, the label shape, their element types), not what may differ (how many
    samples, which labels)."""
    from ..trainer import DataSummary
    from ..trainers.pytorch import load_split

    x, y = load_split(Path(data_dir), file_name)
    schema = {"x": {"shape": list(x.shape[1:]), "dtype": str(x.dtype)},
              "y": {"shape": list(y.shape[1:]), "dtype": str(y.dtype)}}
    return DataSummary(num_samples=len(x), schema=schema)
