"""scikit-learn's bundled handwritten digits (1797 images, 8x8, 10 classes; no download) as tensors."""

from __future__ import annotations

import torch


def load_digits_split(
    test_fraction: float = 0.25, split_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images ``[N, 1, 8, 8]`` float32 in [0, 1], labels ``[N]`` int64.

    The split is a fixed permutation drawn from ``split_seed`` (the same for every
    training seed, so paired runs share data). Needs scikit-learn (the demo extra)."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data needs scikit-learn: pip install 'spark_ext[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]
