"""The ``splits.tsv`` contract (series_uid, subset, fold), the per-fold roles of scans, and ``luna-split``.

Every scan found under the selected subsets gets a fold (docs/design.md, "splits.tsv"):

* ``folds: subsets`` — LUNA16's protocol: the fold is the subset's number (``subset3`` -> 3);
* ``folds: k`` — ``int.from_bytes(sha256(series_uid)[:8], "big") % k``: a stable hash of the UID alone, so
  adding or removing scans never moves another scan to another fold.

For one test fold, :func:`fold_roles` gives every scan one role: ``test`` (the fold itself: never trained on,
never chosen on), ``selection`` (a stable-hash share of the other folds' scans: what chooses the kept epoch
and the threshold) or ``train`` (the rest). The split is by scan, never by candidate (the book's leak).
Only pandas and numpy are imported (SimpleITK only inside ``luna-split``), so every stage reads splits without
SimpleITK or torch.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from luna.app import StageApp
from luna.io import OutputError, check_outside_scan_folders, check_writable_dir, write_tsv
from luna.tables import file_line, read_tsv

logger = logging.getLogger(__name__)

SPLITS_TSV_COLUMNS = ["series_uid", "subset", "fold"]
ROLES = ("train", "selection", "test")
FOLDS_BY_SUBSET = "subsets"


class SplitsError(ValueError):
    """A split that cannot be made or used; the one-line message names the file and line, or the value."""


# ----------------------------------------------------------------------------------------------------
# folds and roles (pure functions)
# ----------------------------------------------------------------------------------------------------

def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def hash_fold(series_uid: str, n_folds: int) -> int:
    """The fold of a scan under ``folds: k``: ``int.from_bytes(sha256(uid)[:8], "big") % k``."""
    return _hash64(series_uid) % int(n_folds)


MAX_FOLD = 999_999_999
"""The highest fold number splits.tsv holds (nine digits: never past int64 where it is read)."""


def subset_number(subset: str) -> int:
    """The number a subset folder's name ends in (``subset7`` -> 7): its fold under ``folds: subsets``. Only the
    last component of a path counts, and a name with digits before its number (``subset1_v2``) is refused: its
    fold would be a guess."""
    name = Path(str(subset)).name
    match = re.fullmatch(r"\D*(\d+)", name)
    if match is None:
        raise SplitsError(f"subset {subset!r} does not end in its only number; split.folds: subsets needs folders "
                          "named like subset0 ... subset9 (or give a number of folds)")
    number = int(match.group(1))
    if number > MAX_FOLD:
        raise SplitsError(f"subset {subset!r}: its number {number} is past the highest fold, {MAX_FOLD}")
    return number


def subset_folds(subsets: Iterable[str]) -> dict[str, int]:
    """``{subset: fold}`` under ``folds: subsets``; two folders with one number (``subset1``, ``subset01``)
    would merge into one fold and are refused."""
    folds: dict[str, int] = {}
    for subset in sorted(set(map(str, subsets))):
        number = subset_number(subset)
        twin = next((other for other, fold in folds.items() if fold == number), None)
        if twin is not None:
            raise SplitsError(f"subsets {twin!r} and {subset!r} both have number {number}: under split.folds: "
                              "subsets each fold is one subset folder")
        folds[subset] = number
    return folds


def parse_folds(value: int | str) -> int | str:
    """``split.folds``: ``subsets`` or a number of folds >= 2."""
    if isinstance(value, str) and value.strip() == FOLDS_BY_SUBSET:
        return FOLDS_BY_SUBSET
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise SplitsError(f"folds must be 'subsets' or a whole number from 2 to {MAX_FOLD + 1}, got {value!r}") from None
    if k < 2 or k > MAX_FOLD + 1 or str(k) != str(value).strip():
        raise SplitsError(f"folds must be 'subsets' or a whole number from 2 to {MAX_FOLD + 1}, got {value!r}")
    return k


def make_splits(scans: Mapping[str, str], folds: int | str) -> pd.DataFrame:
    """splits.tsv rows for ``{series_uid: subset}``: one per scan, sorted by UID, with its fold."""
    folds = parse_folds(folds)
    uids = sorted(scans)
    if folds == FOLDS_BY_SUBSET:
        by_subset = subset_folds(scans.values())
        fold = [by_subset[str(scans[uid])] for uid in uids]
    else:
        fold = [hash_fold(uid, int(folds)) for uid in uids]
    return pd.DataFrame({"series_uid": uids, "subset": [scans[uid] for uid in uids],
                         "fold": np.asarray(fold, dtype=np.int64)})


def is_selection(series_uid: str, test_fold: int, fraction: float) -> bool:
    """Whether a non-test scan chooses (kept epoch, threshold) for ``test_fold``: a stable hash of the UID and
    the test fold below ``fraction``, so each scan is trained on in most folds and chooses in some."""
    return _hash64(f"selection:{int(test_fold)}:{series_uid}") / 2.0**64 < fraction


def fold_roles(splits: pd.DataFrame, test_fold: int, selection_fraction: float,
               source: str | os.PathLike = "splits.tsv") -> dict[str, str]:
    """``{series_uid: role}`` for one test fold: ``test`` (its scans), ``selection`` (see
    :func:`is_selection`) or ``train``. A test fold without scans is an error naming the folds there are."""
    if not 0.0 <= selection_fraction < 1.0:
        raise SplitsError(f"selection fraction must be >= 0 and < 1, got {selection_fraction}")
    folds = splits["fold"].to_numpy(dtype=np.int64)
    if not (folds == int(test_fold)).any():
        present = ", ".join(str(f) for f in sorted(set(folds.tolist())))
        raise SplitsError(f"{source}: test fold {test_fold} has no scans (folds present: {present or 'none'})")
    roles = {}
    for uid, fold in zip(splits["series_uid"], folds):
        if fold == int(test_fold):
            roles[uid] = "test"
        elif is_selection(uid, int(test_fold), selection_fraction):
            roles[uid] = "selection"
        else:
            roles[uid] = "train"
    return roles


def scans_with_role(roles: Mapping[str, str], role: str) -> list[str]:
    """The UIDs of one role, sorted."""
    return sorted(uid for uid, r in roles.items() if r == role)


# ----------------------------------------------------------------------------------------------------
# the file
# ----------------------------------------------------------------------------------------------------

def read_splits_tsv(path: str | os.PathLike) -> pd.DataFrame:
    """splits.tsv checked: its columns, every fold a whole number >= 0, each scan once. ``series_uid`` and
    ``subset`` are strings, ``fold`` int64. Errors name the file and its line (the header is line 1)."""
    path = Path(path)
    frame = read_tsv(path, what="splits file", error=SplitsError, required=SPLITS_TSV_COLUMNS,
                     dtype=str, keep_default_na=False)
    bad = ~frame["fold"].str.fullmatch(r"\d{1,9}")  # a fold number, not one past int64 (an OverflowError)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise SplitsError(f"{path}:{file_line(path, row)}: fold {frame['fold'].iloc[row]!r} is not a fold number "
                          f"(a whole number from 0 to {MAX_FOLD})")
    empty = frame["series_uid"].str.strip() == ""
    if empty.any():
        raise SplitsError(f"{path}:{file_line(path, int(np.flatnonzero(empty.to_numpy())[0]))}: empty series_uid")
    duplicated = frame["series_uid"].duplicated()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated.to_numpy())[0])
        raise SplitsError(f"{path}:{file_line(path, row)}: series_uid {frame['series_uid'].iloc[row]} listed twice")
    frame["fold"] = frame["fold"].astype(np.int64)
    return frame


def write_splits_tsv(splits: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write splits.tsv atomically (temp file + rename)."""
    return write_tsv(splits[SPLITS_TSV_COLUMNS], path)


def read_fold_roles(path: str | os.PathLike, test_fold: int, selection_fraction: float) -> dict[str, str]:
    """splits.tsv read and checked, then :func:`fold_roles` for ``test_fold``."""
    return fold_roles(read_splits_tsv(path), test_fold, selection_fraction, source=path)


# ----------------------------------------------------------------------------------------------------
# luna-split
# ----------------------------------------------------------------------------------------------------

def _folds_arg(text: str) -> int | str:
    try:
        return parse_folds(text)
    except SplitsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class SplitApp(StageApp):
    """Write splits.tsv (series_uid, subset, fold): every scan under the selected subsets gets a fold, by its
    subset's number (LUNA16's protocol) or by a stable hash of its UID."""

    prog = "luna-split"
    errors = (SplitsError, FileNotFoundError, OutputError, ValueError)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--root", required=True, help="data folder holding subset*/<series_uid>.mhd")
        parser.add_argument("--subsets", nargs="*", default=[], help="subset folders to use; none = every subset*")
        parser.add_argument("--folds", type=_folds_arg, default=FOLDS_BY_SUBSET,
                            help="'subsets': fold = the subset's number (LUNA16's 10-fold protocol); K: K folds by "
                                 "the first 8 bytes of sha256(series_uid), big-endian, %% K (adding or removing scans "
                                 "moves no other scan)")
        parser.add_argument("--out", required=True, help="output splits.tsv")

    def run(self) -> pd.DataFrame:
        from luna.ct import find_scans

        a = self.args
        check_writable_dir(Path(a.out).parent, "output folder")  # found before the scans are listed
        scans = find_scans(a.root, a.subsets or None)
        if not scans:
            raise SplitsError(f"{a.root}: no scans (<series_uid>.mhd) under "
                              f"{', '.join(a.subsets) if a.subsets else 'any subset* folder'}")
        check_outside_scan_folders(a.out, [scan.path for scan in scans.values()], root=a.root)
        splits = make_splits({uid: scan.subset for uid, scan in scans.items()}, a.folds)
        write_splits_tsv(splits, a.out)
        counts = splits["fold"].value_counts().sort_index()
        logger.info("wrote %s: %d scans in %d folds (%s)", a.out, len(splits), len(counts),
                    ", ".join(f"fold {fold}: {n}" for fold, n in counts.items()))
        if a.folds != FOLDS_BY_SUBSET:
            n_empty = int(a.folds) - len(counts)
            if n_empty:  # too few scans for k folds: a run of such a fold has nothing to test on
                # the first ten (never a walk over all k: k may be a billion)
                empty = [k for k in range(min(int(a.folds), len(counts) + 10)) if k not in counts.index][:10]
                logger.warning("fold(s) %s%s of %s hold no scan (%d scans); use fewer folds",
                               ", ".join(map(str, empty)), f" and {n_empty - len(empty)} more" if n_empty > len(empty)
                               else "", a.folds, len(splits))
        return splits


main = SplitApp.console
