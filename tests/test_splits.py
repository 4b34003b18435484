"""luna.splits: folds (by subset, by stable hash), per-fold roles, the one splits.tsv reader and luna-split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from luna.ct import write_scan
from luna.geometry import Geometry
from luna.splits import (
    SplitApp,
    SplitsError,
    fold_roles,
    hash_fold,
    make_splits,
    read_splits_tsv,
    subset_number,
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _uids(n: int, prefix: str = "1.3.6.1.4.1.14519.5.2.1.6279.6001.") -> list[str]:
    rng = np.random.default_rng(3)
    return [prefix + "".join(map(str, rng.integers(0, 10, 30))) for _ in range(n)]


def test_subsets_protocol_fold_is_the_subset_number() -> None:
    scans = {"1.5": "subset3", "1.2": "subset0", "1.9": "subset9", "1.1": "subset3"}
    splits = make_splits(scans, "subsets")
    assert splits.to_dict("list") == {"series_uid": ["1.1", "1.2", "1.5", "1.9"],
                                      "subset": ["subset3", "subset0", "subset3", "subset9"], "fold": [3, 0, 3, 9]}
    assert subset_number("subset12") == 12
    with pytest.raises(SplitsError, match="subset 'extra' does not end in its only number"):
        make_splits({"1.1": "extra"}, "subsets")
    # digits before the number would make the fold a guess (subset1_v2 was fold 2, merged with subset2)
    with pytest.raises(SplitsError, match="subset 'subset1_v2' does not end in its only number"):
        make_splits({"1.1": "subset1_v2", "1.2": "subset2"}, "subsets")
    # two folders with one number were one fold; now refused, naming both
    with pytest.raises(SplitsError, match="subsets 'subset01' and 'subset1' both have number 1"):
        make_splits({"1.1": "subset01", "1.2": "subset1", "1.3": "subset0"}, "subsets")
    assert subset_number("data/subset07") == 7 and subset_number("fold3") == 3


def test_hash_folds_are_sha256_of_the_uid_and_stable_when_scans_come_and_go() -> None:
    uids = _uids(300)
    scans = {uid: f"subset{i % 3}" for i, uid in enumerate(uids)}
    splits = make_splits(scans, 5)
    expected = [int.from_bytes(hashlib.sha256(u.encode()).digest()[:8], "big") % 5 for u in splits["series_uid"]]
    assert splits["fold"].tolist() == expected
    assert set(splits["fold"]) == {0, 1, 2, 3, 4}
    assert splits["fold"].value_counts().min() > 40  # about 60 each
    # remove subset1 and add new scans: no remaining scan changes fold
    fewer = {u: s for u, s in scans.items() if s != "subset1"} | {u: "subset7" for u in _uids(20, "2.")}
    after = make_splits(fewer, 5).set_index("series_uid")["fold"]
    before = splits.set_index("series_uid")["fold"]
    common = before.index.intersection(after.index)
    assert len(common) == 200
    assert (before[common] == after[common]).all()
    assert hash_fold(uids[0], 5) == before[uids[0]]


@pytest.mark.parametrize("bad", [1, 0, "two", "3.5", -2])
def test_bad_fold_counts_are_refused(bad) -> None:
    with pytest.raises(SplitsError, match="folds must be 'subsets' or a whole number from 2 to 1000000000"):
        make_splits({"1.1": "subset0"}, bad)


def test_roles_keep_the_test_fold_apart_and_draw_selection_from_the_others() -> None:
    uids = _uids(400)
    splits = make_splits({u: f"subset{i % 4}" for i, u in enumerate(uids)}, "subsets")
    for test_fold in range(4):
        roles = fold_roles(splits, test_fold, 0.25)
        fold_of = dict(zip(splits["series_uid"], splits["fold"]))
        assert {u for u, r in roles.items() if r == "test"} == {u for u, f in fold_of.items() if f == test_fold}
        selection = {u for u, r in roles.items() if r == "selection"}
        assert all(fold_of[u] != test_fold for u in selection)
        assert 50 < len(selection) < 100  # 25% of 300
        assert set(roles.values()) == {"train", "selection", "test"}
    # selection depends on the test fold: a scan chooses in some folds and is trained on in others
    sel0 = {u for u, r in fold_roles(splits, 0, 0.25).items() if r == "selection"}
    sel1 = {u for u, r in fold_roles(splits, 1, 0.25).items() if r == "selection"}
    assert sel0 != sel1
    assert not any(r == "selection" for r in fold_roles(splits, 0, 0.0).values())


def test_an_empty_test_fold_is_named(tmp_path: Path) -> None:
    splits = make_splits({"1.1": "subset0", "1.2": "subset2"}, "subsets")
    with pytest.raises(SplitsError, match=r"splits.tsv: test fold 1 has no scans \(folds present: 0, 2\)"):
        fold_roles(splits, 1, 0.2)


def test_reads_columns_in_any_order_uids_as_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "splits.tsv", "fold\tseries_uid\tsubset\tnote\n1\t1.2.3\tsubset1\tx\n0\t007\tsubset0\t\n")
    frame = read_splits_tsv(path)
    assert list(frame["series_uid"]) == ["1.2.3", "007"]  # "007" stays a string, not 7
    assert frame["fold"].tolist() == [1, 0] and frame["fold"].dtype == np.int64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("series_uid\tsplit\na\ttrain\n", r"splits.tsv:1: missing column\(s\) subset, fold \(has series_uid, split\)"),
        ("series_uid\tsubset\tfold\na\ts0\t0\nb\ts0\tval\n", r"splits.tsv:3: fold 'val' is not a fold number"),
        ("series_uid\tsubset\tfold\na\ts0\t0\nb\ts0\t\n", r"splits.tsv:3: fold '' is not a fold number"),
        ("series_uid\tsubset\tfold\na\ts0\t-1\n", r"splits.tsv:2: fold '-1' is not a fold number"),
        ("series_uid\tsubset\tfold\na\ts0\t0\nb\ts0\t1\na\ts0\t1\n", r"splits.tsv:4: series_uid a listed twice"),
        # pandas skips blank lines: the message names the file's own line, not the row's position + 2
        ("series_uid\tsubset\tfold\n\na\ts0\t0\n  \nb\ts0\tval\n", r"splits.tsv:5: fold 'val' is not a fold number"),
        ("\nseries_uid\tsubset\tfold\na\ts0\t0\n\r\na\ts0\t1\n", r"splits.tsv:5: series_uid a listed twice"),
        ("series_uid\tsubset\tfold\na\ts0\t99999999999999999999\n",  # not an OverflowError's traceback
         r"splits.tsv:2: fold '99999999999999999999' is not a fold number \(a whole number from 0 to 999999999\)"),
        ("", r"splits.tsv: not a readable TSV"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "splits.tsv", text)
    with pytest.raises(SplitsError, match=message):
        read_splits_tsv(path)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SplitsError, match=r"nope.tsv: no such splits file$"):
        read_splits_tsv(tmp_path / "nope.tsv")


def _data_root(tmp_path: Path) -> Path:
    geometry = Geometry([0, 0, 0], [1, 1, 1])
    for subset, uid in [("subset0", "1.1"), ("subset0", "1.3"), ("subset1", "1.2"), ("subset2", "1.4")]:
        write_scan(tmp_path / subset / f"{uid}.mhd", np.zeros((2, 2, 2), np.int16), geometry)
    return tmp_path


def test_split_app_lists_every_scan_with_its_fold(tmp_path: Path) -> None:
    root = _data_root(tmp_path)
    out = tmp_path / "splits.tsv"
    assert SplitApp(["--root", str(root), "--out", str(out)]).main() == 0
    assert out.read_text() == ("series_uid\tsubset\tfold\n1.1\tsubset0\t0\n1.2\tsubset1\t1\n1.3\tsubset0\t0\n"
                               "1.4\tsubset2\t2\n")
    assert SplitApp(["--root", str(root), "--subsets", "subset0", "subset2", "--folds", "3", "--out", str(out)]).main() == 0
    frame = read_splits_tsv(out)
    assert frame["series_uid"].tolist() == ["1.1", "1.3", "1.4"]
    assert frame["fold"].tolist() == [hash_fold(u, 3) for u in ["1.1", "1.3", "1.4"]]


def test_split_app_errors_are_one_line(tmp_path: Path, capsys) -> None:
    root = _data_root(tmp_path)
    out = tmp_path / "splits.tsv"
    assert SplitApp(["--root", str(root), "--subsets", "subset9", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err.strip() == f"luna-split: error: {root / 'subset9'}: subset folder not found"
    (root / "empty7").mkdir()
    assert SplitApp(["--root", str(root), "--subsets", "empty7", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err == (f"luna-split: error: {root / 'empty7'}: no <series_uid>.mhd scan in this "
                                       "subset folder\n")
    assert not out.exists()
    with pytest.raises(SystemExit):
        SplitApp(["--root", str(root), "--folds", "1", "--out", str(out)])
    assert "folds must be 'subsets' or a whole number from 2 to 1000000000" in capsys.readouterr().err
    # an output folder that cannot be made is found first, before the scans are listed (as every stage does)
    (tmp_path / "afile").write_text("")
    assert SplitApp(["--root", str(root), "--subsets", "subset9", "--out", str(tmp_path / "afile" / "s.tsv")]).main() == 2
    assert capsys.readouterr().err == (f"luna-split: error: {tmp_path / 'afile'}: cannot write to the output folder "
                                       "(a file is in the way: not a folder)\n")


def test_splits_frame_round_trips(tmp_path: Path) -> None:
    splits = make_splits({u: "subset4" for u in _uids(5)}, 2)
    from luna.splits import write_splits_tsv

    write_splits_tsv(splits, tmp_path / "s.tsv")
    pd.testing.assert_frame_equal(read_splits_tsv(tmp_path / "s.tsv"), splits)


def test_split_app_warns_of_folds_without_scans(tmp_path: Path, caplog) -> None:
    root = _data_root(tmp_path)  # 4 scans
    assert SplitApp(["--root", str(root), "--folds", "9", "--out", str(tmp_path / "s.tsv")]).main() == 0
    empty = sorted(set(range(9)) - {hash_fold(u, 9) for u in ["1.1", "1.2", "1.3", "1.4"]})
    assert f"fold(s) {', '.join(map(str, empty))} of 9 hold no scan (4 scans); use fewer folds" in caplog.text


def test_a_billion_folds_is_the_most_and_its_warning_is_quick(tmp_path: Path, caplog, capsys) -> None:
    """Folds past splits.tsv's nine digits were written and then refused by its own reader; the warning walked
    every empty fold (minutes for 10^10). A subset numbered past it is refused too."""
    root = _data_root(tmp_path)  # 4 scans
    out = tmp_path / "s.tsv"
    assert SplitApp(["--root", str(root), "--folds", "1000000000", "--out", str(out)]).main() == 0
    assert len(read_splits_tsv(out)) == 4
    assert "fold(s) 0, 1, 2, 3, 4, 5, 6, 7, 8, 9 and 999999986 more of 1000000000 hold no scan (4 scans)" in caplog.text
    with pytest.raises(SystemExit):
        SplitApp(["--root", str(root), "--folds", "1000000001", "--out", str(out)])
    assert "folds must be 'subsets' or a whole number from 2 to 1000000000, got '1000000001'" in capsys.readouterr().err
    with pytest.raises(SplitsError, match="subset 'subset1000000000': its number 1000000000 is past the highest fold"):
        subset_number("subset1000000000")


def test_split_out_in_a_scan_folder_is_refused(tmp_path: Path, capsys) -> None:
    """--out naming a scan's header replaced the scan with splits.tsv."""
    root = _data_root(tmp_path)
    header = next((root / "subset0").glob("*.mhd"))
    before = header.read_bytes()
    assert SplitApp(["--root", str(root), "--folds", "2", "--out", str(header)]).main() == 2
    assert capsys.readouterr().err.strip() == (f"luna-split: error: --out {header} lies in the scan folder "
                                               f"{header.parent}; write it elsewhere")
    assert header.read_bytes() == before
    other = next((root / "subset1").glob("*.mhd"))  # a subset this run does not split: its header was replaced
    other_bytes = other.read_bytes()
    assert SplitApp(["--root", str(root), "--subsets", "subset0", "--folds", "2", "--out", str(other)]).main() == 2
    assert capsys.readouterr().err.strip() == (f"luna-split: error: --out {other} lies in the scan folder "
                                               f"{other.parent}; write it elsewhere")
    assert other.read_bytes() == other_bytes


def test_a_subset_folder_of_symlinks_is_the_scan_folder(tmp_path: Path, capsys) -> None:
    """Subset folders of links to a shared copy: the folder holding the links is the scan folder (the links'
    targets were taken for it: --out in the subset folder passed, --out beside the shared copy was refused)."""
    store = _data_root(tmp_path / "store")
    root = tmp_path / "root"
    (root / "subset0").mkdir(parents=True)
    for name in ("1.1.mhd", "1.1.raw", "1.3.mhd", "1.3.raw"):
        (root / "subset0" / name).symlink_to(store / "subset0" / name)
    assert SplitApp(["--root", str(root), "--folds", "2", "--out", str(store / "subset0" / "s.tsv")]).main() == 0
    out = root / "subset0" / "s.tsv"
    assert SplitApp(["--root", str(root), "--folds", "2", "--out", str(out)]).main() == 2
    assert f"--out {out} lies in the scan folder {root / 'subset0'}" in capsys.readouterr().err
    assert not out.exists()
