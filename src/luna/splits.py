"""The ``splits.tsv`` contract (columns series_uid, split): one reader for every stage.

The split is per scan (never per candidate, the book's leak): a scan's candidates are all train or all val.
This module has no heavy imports, so the training and validation stages read splits without SimpleITK.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from luna.tables import read_tsv

SPLITS = ("train", "val")
SPLITS_TSV_COLUMNS = ["series_uid", "split"]


class SplitsError(ValueError):
    """A splits.tsv that cannot be used; the one-line message names the file and line."""


def read_splits_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """splits.tsv as a DataFrame of strings, checked: columns, every split train or val, each scan once.

    Errors name the file and its line (the header is line 1)."""
    path = Path(path)
    frame = read_tsv(path, what="splits file", error=SplitsError, required=SPLITS_TSV_COLUMNS,
                     dtype=str, keep_default_na=False)
    bad = ~frame["split"].isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SplitsError(f"{path}:{row + 2}: split {frame['split'].iloc[row]!r} is not train or val")
    duplicated = frame["series_uid"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise SplitsError(f"{path}:{row + 2}: series_uid {frame['series_uid'].iloc[row]} listed twice")
    return frame


def split_of_scan(path: str | os.PathLike) -> dict[str, str]:
    """splits.tsv as ``{series_uid: split}`` (checked as :func:`read_splits_tsv`)."""
    frame = read_splits_tsv(path)
    return dict(zip(frame["series_uid"], frame["split"]))
