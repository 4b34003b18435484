"""Test helpers for crop stores."""

from __future__ import annotations

import os

import h5py
import numpy as np

from luna.store import ROW_FIELDS


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every dataset of a store as numpy arrays, to compare the stores of two runs."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        for name in ("crops", *ROW_FIELDS):
            ds = f[name]
            out[name] = ds.asstr()[:] if name == "series_uid" else ds[:]
    return out
