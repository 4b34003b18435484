"""Tables that would silently give a wrong or empty result: header only, duplicate rows, a malformed row, a
subset that is not in candidates.tsv. Each is one line naming the file (and line); duplicates are dropped with
one warning."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from luna.candidates import CandidatesApp, build_candidates_table, read_candidates_tsv
from luna.luna16 import TableError, read_annotations_csv, read_candidates_csv
from luna.crops import CropApp, CropError, read_subset_candidates
from luna.evaluation import PREDICTION_COLUMNS, EvaluationError, read_predictions_tsv
from luna.splits import SplitsError, read_splits_tsv
from luna.ct import ScanFile, write_scan
from luna.geometry import Geometry

HEADER = "seriesuid,coordX,coordY,coordZ,class\n"


def _write(tmp_path, text: str, name: str = "candidates.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _data_root(tmp_path, candidates: str):
    write_scan(tmp_path / "subset0" / "1.1.mhd", np.zeros((2, 2, 2), np.int16), Geometry([0, 0, 0], [1, 1, 1]))
    _write(tmp_path, candidates)
    return tmp_path


# ---------------------------------------------------------------------------------------------------- header only


def test_header_only_candidates_and_annotations_are_errors(tmp_path) -> None:
    cand = _write(tmp_path, HEADER)
    with pytest.raises(TableError) as info:
        read_candidates_csv(cand)
    assert str(info.value) == f"{cand}: no rows, only the header line"
    ann = _write(tmp_path, "seriesuid,coordX,coordY,coordZ,diameter_mm\r\n", "annotations.csv")
    with pytest.raises(TableError, match=r"annotations\.csv: no rows, only the header line$"):
        read_annotations_csv(ann)
    # annotations_excluded.csv may list nothing: an empty table, with its columns
    excluded = read_annotations_csv(ann, allow_negative=True)
    assert len(excluded) == 0 and list(excluded.columns) == ["seriesuid", "coordX", "coordY", "coordZ",
                                                             "diameter_mm", "line"]


def test_candidates_app_header_only_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    root = _data_root(tmp_path, HEADER)
    out = tmp_path / "results" / "candidates.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err == (f"luna-candidates: error: {root / 'candidates.csv'}: no rows, only the header "
                                       "line\n")
    assert not out.exists() and list(out.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- malformed rows


def test_row_with_too_many_fields_names_file_and_line(tmp_path, capsys) -> None:
    path = _write(tmp_path, HEADER + "1.1,1,2,3,0\n1.1,1,2,3,0,9\n")
    with pytest.raises(TableError) as info:
        read_candidates_csv(path)
    assert str(info.value) == f"{path}:3: 6 fields where the header has 5"
    root = _data_root(tmp_path, HEADER + "1.1,1,2,3,0\r\n1.1,4,5,6,1\r\n1.1,1,2,3,0,9\r\n")
    out = tmp_path / "c.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err == (f"luna-candidates: error: {root / 'candidates.csv'}:4: 6 fields where the "
                                       "header has 5\n")
    assert not out.exists()


def test_every_row_one_field_longer_than_the_header_is_an_error(tmp_path, capsys) -> None:
    """pandas would make the first field an index and shift every column: uids read as coordinates, silently."""
    root = _data_root(tmp_path, "seriesuid,coordX,coordY,coordZ\n1.1,10,20,30,0\n1.1,11,21,31,1\n")
    out = tmp_path / "c.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 2
    assert capsys.readouterr().err == (f"luna-candidates: error: {root / 'candidates.csv'}:2: 5 fields where the "
                                       "header has 4\n")
    assert not out.exists()
    path = _write(tmp_path, "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,1,2,3,4,0\n", "annotations.csv")
    with pytest.raises(TableError, match=r"annotations\.csv:2: 6 fields where the header has 5$"):
        read_annotations_csv(path)


def test_row_with_too_few_fields_names_the_empty_column(tmp_path) -> None:
    path = _write(tmp_path, HEADER + "1.1,1,2,3,0\n1.1,1,2\n")
    with pytest.raises(TableError) as info:
        read_candidates_csv(path)
    assert str(info.value) == f"{path}:3: column coordZ is empty (a missing field?)"



def test_blank_lines_are_no_rows_and_keep_line_numbers(tmp_path) -> None:
    """An empty last line (an editor's extra newline) or an empty line between rows is skipped; the lines after
    it keep their numbers in the file; a file of a header and blank lines has no rows."""
    path = _write(tmp_path, HEADER + "1.1,1,2,3,0\n\n1.1,4,5,6,1\n\n")
    table = read_candidates_csv(path)
    assert table["coordX"].tolist() == [1.0, 4.0] and table["line"].tolist() == [2, 4]
    bad = _write(tmp_path, HEADER + "1.1,1,2,3,0\n\n1.1,x,5,6,1\n", "bad.csv")
    with pytest.raises(TableError) as info:
        read_candidates_csv(bad)
    assert str(info.value) == f"{bad}:4: column coordX is not a finite number: 'x'"
    with pytest.raises(TableError, match=r"blank\.csv: no rows, only the header line$"):
        read_candidates_csv(_write(tmp_path, HEADER + "\n\n", "blank.csv"))
    # a row of empty fields is not a blank line: its values may have been lost
    for name, text in (("commas.csv", HEADER + "1.1,1,2,3,0\n,,,,\n"),
                       ("note.csv", HEADER.strip() + ",note\n1.1,1,2,3,0,\n,,,,,see above\n")):
        with pytest.raises(TableError) as info:
            read_candidates_csv(_write(tmp_path, text, name))
        assert str(info.value) == f"{tmp_path / name}:3: empty seriesuid"


def test_unreadable_csv_is_one_line(tmp_path) -> None:
    path = tmp_path / "candidates.csv"
    path.write_bytes(HEADER.encode() + b'"1.1,1,2,3,0\n')  # quote never closed
    with pytest.raises(TableError) as info:
        read_candidates_csv(path)
    assert str(info.value) == (f"{path}:2: a quoted field is not closed (a '\"' without its pair: the field runs "
                               "to the end of the file)")


@pytest.mark.parametrize(("name", "data", "expected"), [
    # Excel's trailing empty columns and a repeated column the reader does not use: read (were refused)
    ("excel.csv", (HEADER.strip() + ",,\n1.1,1,2,3,0,,\n").encode(), None),
    ("notes.csv", (HEADER.strip() + ",notes,notes\n1.1,1,2,3,0,a,b\n").encode(), None),
    ("stripped_twins.csv", (HEADER.strip() + ",note ,note\n1.1,1,2,3,0,a,b\n\n").encode(), None),  # was a traceback
    ("tabs.csv", HEADER.replace(",", "\t").encode() + b"1.1\t1\t2\t3\t0\n",
     "{path}:1: not comma-separated (the header is split by tabs); LUNA16 tables are CSV with the header "
     "seriesuid,coordX,coordY,coordZ,class"),
    ("semicolons.csv", HEADER.replace(",", ";").encode() + b"1.1;1;2;3;0\n",
     "{path}:1: not comma-separated (the header is split by semicolons); LUNA16 tables are CSV with the header "
     "seriesuid,coordX,coordY,coordZ,class"),
    ("blank_first.csv", b"\n" + HEADER.encode() + b"1.1,1,2,3,0\n",
     "{path}:1: blank line where the header seriesuid,coordX,coordY,coordZ,class should be (the header must be "
     "the first line)"),
    ("latin1.csv", HEADER.encode() + b"1.1,1,2,3,0\n1.\xe9,1,2,3,0\n",  # was "byte 0xe9 in position 44"
     "{path}:3: not UTF-8 text (byte 0xe9); save the table as UTF-8 (e.g. Excel's \"CSV UTF-8\")"),
    ("utf16.csv", (HEADER + "1.1,1,2,3,0\n").encode("utf-16"),
     "{path}: UTF-16 text; save the table as UTF-8 (e.g. Excel's \"CSV UTF-8\")"),
])
def test_csv_variants_real_users_have(tmp_path, name, data, expected) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    if expected is None:
        table = read_candidates_csv(path)
        assert table["seriesuid"].tolist() == ["1.1"] and table["coordZ"].tolist() == [3.0]
        return
    with pytest.raises(TableError) as info:
        read_candidates_csv(path)
    assert str(info.value) == expected.format(path=path)


def test_a_folder_for_a_table_is_named_as_such(tmp_path) -> None:
    with pytest.raises(TableError) as info:
        read_candidates_csv(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a folder, not a CSV file"


# ---------------------------------------------------------------------------------------------------- duplicates


def test_duplicate_candidates_dropped_with_one_warning(tmp_path, caplog) -> None:
    text = HEADER + "1.1,1,2,3,0\n1.1,4,5,6,1\n1.1,1.0,2.00,3,0\n1.1,7,8,9,0\n1.1,4,5,6,1\n1.1,1,2,3,0\n"
    root = _data_root(tmp_path, text)
    scans = {"1.1": ScanFile("1.1", "subset0", root / "subset0" / "1.1.mhd")}
    table, report = build_candidates_table(root / "candidates.csv", None, scans)
    assert table["candidate_id"].tolist() == [0, 1, 3]  # row numbers in the CSV: the first of each kept
    assert table[["coord_x", "coord_y", "coord_z"]].to_numpy().tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert report.n_rows == 6 and report.n_kept == 3
    warning = (f"{root / 'candidates.csv'}: 3 duplicate candidate rows dropped (same seriesuid, coordinates and "
               "class as an earlier row; first: line 4 repeats line 2)")
    assert report.lines()[1:] == [warning]

    caplog.set_level(logging.INFO, logger="luna.candidates")
    out = tmp_path / "candidates.tsv"
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(out)]).main() == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    assert read_candidates_tsv(out)["candidate_id"].tolist() == [0, 1, 3]


def test_same_point_with_two_classes_names_both_lines(tmp_path) -> None:
    path = _write(tmp_path, HEADER + "1.1,1,2,3,0\n1.1,4,5,6,1\n1.1,4,5,6,0\n1.1,1,2,3,1\n")
    with pytest.raises(TableError) as info:
        build_candidates_table(path, None, {})
    assert str(info.value) == f"{path}:5: same seriesuid and coordinates as line 2 but class 1 where that line has 0"


def test_same_point_in_two_scans_is_not_a_duplicate(tmp_path) -> None:
    path = _write(tmp_path, HEADER + "1.1,1,2,3,0\n1.2,1,2,3,0\n")
    scans = {u: ScanFile(u, "subset0", tmp_path / f"{u}.mhd") for u in ("1.1", "1.2")}
    table, report = build_candidates_table(path, None, scans)
    assert table["series_uid"].tolist() == ["1.1", "1.2"] and len(report.lines()) == 1


# ---------------------------------------------------------------------------------------------------- crop subset


def test_crops_subset_not_in_the_table_exits_2_and_writes_nothing(tmp_path, capsys) -> None:
    tsv = tmp_path / "candidates.tsv"
    rows = [dict(candidate_id=i, series_uid="1.1", subset=s, coord_x=0.0, coord_y=0.0, coord_z=0.0, is_nodule=0,
                 diameter_mm=0.0) for i, s in enumerate(["subset1", "subset0", "subset1"])]
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    out = tmp_path / "crops" / "subset9.h5"
    argv = ["--candidates", str(tsv), "--root", str(tmp_path), "--subset", "subset9", "--out", str(out)]
    assert CropApp(argv).main() == 2
    assert capsys.readouterr().err == (f"luna-crops: error: {tsv}: no candidates of subset 'subset9' (its subsets "
                                       "are subset0, subset1)\n")
    assert not out.parent.exists()  # nothing written, not even the folder
    header_only = tmp_path / "empty.tsv"
    header_only.write_text("\t".join(rows[0]) + "\n")
    with pytest.raises(CropError) as info:
        read_subset_candidates(header_only, "subset0")
    assert str(info.value) == f"{header_only}: no candidates of subset 'subset0' (it has no rows)"


# ---------------------------------------------------------------------------------------------------- pipeline TSVs


CAND_TSV_HEADER = "candidate_id\tseries_uid\tsubset\tcoord_x\tcoord_y\tcoord_z\tis_nodule\tdiameter_mm\n"


def _candidates_tsv(tmp_path, rows: list[str], header: str = CAND_TSV_HEADER):
    path = tmp_path / "candidates.tsv"
    path.write_text(header + "".join(rows))
    return path


def test_a_trailing_tab_on_every_row_is_named_when_the_ids_count_up_from_0(tmp_path) -> None:
    """pandas makes a first row's extra field an index; with ids 0, 1, 2 (candidates.tsv's own) that index was the
    default 0..n-1, the check passed, and every column shifted by one into a nonsense error."""
    rows = [f"{i}\t1.1\tsubset0\t{i}.5\t2\t3\t0\t0\t\n" for i in range(4)]
    path = _candidates_tsv(tmp_path, rows)
    with pytest.raises(CropError) as info:
        read_subset_candidates(path, "subset0")
    assert str(info.value) == f"{path}:2: 9 fields where the header has 8"
    predictions = tmp_path / "predictions.tsv"
    predictions.write_text("\t".join(PREDICTION_COLUMNS) + "\n" + "".join(
        f"{i}\t1.1\t0\t0\t0\t0\t0\t0.5\t0.7\t0\textra\n" for i in range(3)))
    with pytest.raises(EvaluationError) as info:
        read_predictions_tsv(predictions)
    assert str(info.value) == f"{predictions}:2: 11 fields where the header has 10"
    ok = _candidates_tsv(tmp_path, [f"{i}\t1.1\tsubset0\t{i}.5\t2\t3\t0\t0\n" for i in range(4)])
    assert read_subset_candidates(ok, "subset0")["coord_x"].tolist() == [0.5, 1.5, 2.5, 3.5]


def test_spaces_around_header_cells_and_uids_of_an_edited_tsv_are_stripped(tmp_path) -> None:
    """A table edited by hand: "series_uid " matched no column (the message listed the same name back), and a
    UID with a trailing space matched no scan (luna-train dropped the scan with a warning and trained on less)."""
    splits = tmp_path / "splits.tsv"
    splits.write_text("series_uid \t subset\tfold\n1.1 \tsubset0\t0\n 1.2\tsubset1 \t1\n")
    frame = read_splits_tsv(splits)
    assert frame["series_uid"].tolist() == ["1.1", "1.2"] and frame["subset"].tolist() == ["subset0", "subset1"]
    assert frame["fold"].tolist() == [0, 1]
    predictions = tmp_path / "predictions.tsv"
    predictions.write_text(" \t".join(PREDICTION_COLUMNS) + " \n7\t1.1 \t1.5\t0\t0\t1\t6\t0.9\t0.1\t0\n")
    frame = read_predictions_tsv(predictions)
    assert frame["series_uid"].tolist() == ["1.1"] and frame["coord_x"].tolist() == [1.5]


def test_a_tsv_saved_with_commas_is_said_so(tmp_path) -> None:
    splits = tmp_path / "splits.tsv"
    splits.write_text("series_uid,subset,fold\n1.1,subset0,0\n")
    with pytest.raises(SplitsError) as info:
        read_splits_tsv(splits)
    assert str(info.value) == (f"{splits}:1: not tab-separated (the header is split by commas: saved as CSV?); the "
                               "pipeline's tables are TSV with the columns series_uid, subset, fold")


def test_the_subsets_named_in_a_no_candidates_error_are_capped(tmp_path) -> None:
    rows = [f"{i}\t1.{i}\tsubset{i}\t0\t0\t0\t0\t0\n" for i in range(13)]
    path = _candidates_tsv(tmp_path, rows)
    with pytest.raises(CropError) as info:
        read_subset_candidates(path, "subset99")
    assert str(info.value) == (f"{path}: no candidates of subset 'subset99' (its subsets are subset0, subset1, "
                               "subset10, subset11, subset12, subset2, subset3, subset4, subset5, subset6 and 3 more)")


# ---------------------------------------------------------------------------------------------------- annotations


ANN_HEADER = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"


def test_a_repeated_annotation_is_one_nodule_with_one_warning(tmp_path, caplog) -> None:
    """Two annotation files concatenated: FROC counted the repeat as a second nodule (CPM changed, silently)."""
    path = _write(tmp_path, ANN_HEADER + "1.1,1,2,3,6\n1.1,4,5,6,8\n1.1,1.0,2,3.00,6.0\n1.2,1,2,3,6\n",
                  "annotations.csv")
    caplog.set_level(logging.WARNING, logger="luna.luna16")
    ann = read_annotations_csv(path)
    assert ann[["seriesuid", "diameter_mm"]].values.tolist() == [["1.1", 6.0], ["1.1", 8.0], ["1.2", 6.0]]
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: 1 duplicate annotation rows dropped (same seriesuid, coordinates and diameter_mm as an earlier "
        "row; first: line 4 repeats line 2)"]
    excluded = _write(tmp_path, ANN_HEADER + "1.1,1,2,3,-1\n1.1,1,2,3,-1\n", "annotations_excluded.csv")
    assert len(read_annotations_csv(excluded, allow_negative=True)) == 2  # ignored regions: a repeat changes nothing


def test_one_point_annotated_with_two_diameters_names_both_lines(tmp_path) -> None:
    path = _write(tmp_path, ANN_HEADER + "1.1,1,2,3,6\n1.1,1,2,3,7.5\n", "annotations.csv")
    with pytest.raises(TableError) as info:
        read_annotations_csv(path)
    assert str(info.value) == (f"{path}:3: same seriesuid and coordinates as line 2 but diameter_mm 7.5 where that "
                               "line has 6")


def test_annotations_that_match_no_positive_candidate_are_warned_about(tmp_path) -> None:
    """The official annotations.csv given with another data set's candidates: every diameter 0, said nowhere."""
    root = _data_root(tmp_path, HEADER + "1.1,1,2,3,1\n1.1,4,5,6,0\n")
    scans = {"1.1": ScanFile("1.1", "subset0", root / "subset0" / "1.1.mhd")}
    other = _write(tmp_path, ANN_HEADER + "9.9,1,2,3,6\n9.8,1,2,3,6\n", "annotations.csv")
    table, report = build_candidates_table(root / "candidates.csv", other, scans)
    assert table["diameter_mm"].tolist() == [0.0, 0.0]
    assert report.lines()[1:] == [
        f"{other}: none of the 1 positive candidates matched an annotation (within diameter/4 of its centre), so "
        "every diameter_mm is 0; 0 of its 2 rows are on the scans on disk: the annotations of another data set?"]
    right = _write(tmp_path, ANN_HEADER + "1.1,1,2,3,6\n", "annotations.csv")
    table, report = build_candidates_table(root / "candidates.csv", right, scans)
    assert table["diameter_mm"].tolist() == [6.0, 0.0] and len(report.lines()) == 1
