"""Data recipes. `digits`: scikit-learn's bundled 8x8 handwritten digits, real data, no download."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def digits(seed: int = 0, val_share: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    """1797 grey 8x8 images of 10 digits as (1, 8, 8) float tensors, split stratified into train/val."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images.astype(np.float32) / 16.0 - 0.5) / 0.5
    y = data.target.astype(np.int64)
    x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=val_share, random_state=seed, stratify=y)
    as_ds = lambda a, b: TensorDataset(torch.from_numpy(a[:, None]), torch.from_numpy(b))  # noqa: E731
    return as_ds(x_tr, y_tr), as_ds(x_va, y_va)


def digits_loaders(batch_size: int = 64, seed: int = 0) -> tuple[DataLoader, DataLoader]:
    train, val = digits(seed)
    gen = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=gen),
            DataLoader(val, batch_size=256))
