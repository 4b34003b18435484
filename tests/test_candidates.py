"""LUNA16 tables: parsing with one-line errors, diameter matching, candidates.tsv."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import LUNA16_ANNOTATIONS
from luna.candidates import CandidatesApp, build_candidates_table, read_candidates_tsv
from luna.luna16 import TableError, match_diameters, read_annotations_csv, read_candidates_csv
from luna.crops import CropApp
from luna.ct import ScanFile, write_scan
from luna.geometry import Geometry
from luna.store import CropStore


def test_official_annotations_parse() -> None:
    ann = read_annotations_csv(LUNA16_ANNOTATIONS)
    assert len(ann) == 1186
    assert ann["seriesuid"].nunique() == 601
    assert ann["diameter_mm"].min() >= 3.0
    first = ann.iloc[0]
    assert first["seriesuid"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.100225287222365663678666836860"
    assert first["coordX"] == pytest.approx(-128.6994211)


def write(tmp_path, text: str, name: str = "candidates.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_missing_column_names_file_and_line(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,class\n1.2,1,2,0\n")
    with pytest.raises(TableError, match=r"candidates\.csv:1: missing column 'coordZ'"):
        read_candidates_csv(p)


def test_non_numeric_coordinate_names_file_and_line(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\n1.2,1,abc,3,1\n")
    with pytest.raises(TableError, match=r"candidates\.csv:3: column coordY is not a finite number: 'abc'"):
        read_candidates_csv(p)


def test_duplicate_header_line_names_file_and_line(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,0\nseriesuid,coordX,coordY,coordZ,class\n1.3,1,2,3,0\n")
    with pytest.raises(TableError, match=r"candidates\.csv:3: duplicate header line"):
        read_candidates_csv(p)


def test_duplicate_header_column(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ,coordX\n1.2,1,2,3,4\n")
    with pytest.raises(TableError, match=r"candidates\.csv:1: duplicate column 'coordX'"):
        read_candidates_csv(p)


def test_bad_class_and_diameter(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ,class\n1.2,1,2,3,2\n")
    with pytest.raises(TableError, match=r"candidates\.csv:2: column class must be 0 or 1"):
        read_candidates_csv(p)
    a = write(tmp_path, "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2,1,2,3,-1\n", "annotations.csv")
    with pytest.raises(TableError, match=r"annotations\.csv:2: diameter_mm must be > 0"):
        read_annotations_csv(a)
    assert read_annotations_csv(a, allow_negative=True)["diameter_mm"].tolist() == [-1.0]


def test_candidates_without_class_column(tmp_path) -> None:
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ\n1.2,1,2,3\n")
    df = read_candidates_csv(p)
    assert "class" not in df and df["coordZ"].tolist() == [3.0]
    # 'Class': read as no class column, every row unlabelled, found only by luna-train after the crops
    p = write(tmp_path, "seriesuid,coordX,coordY,coordZ,Class\n1.2,1,2,3,1\n")
    with pytest.raises(TableError) as info:
        read_candidates_csv(p)
    assert str(info.value) == (f"{p}:1: column 'Class': column names are case-sensitive, 'class' is meant? (without a "
                               "'class' column the rows are read without it)")


def test_diameter_matching_book_rule() -> None:
    ann = pd.DataFrame({
        "seriesuid": ["a", "a", "b"],
        "coordX": [0.0, 0.5, 10.0], "coordY": [0.0, 0.0, 10.0], "coordZ": [0.0, 0.0, 10.0],
        "diameter_mm": [4.0, 20.0, 8.0],
    })
    cand = pd.DataFrame({
        "seriesuid": ["a", "a", "a", "b", "b", "c"],
        #   within 1 mm of first -> 4; 3 mm off in x -> only second (20/4=5) matches; far; b: delta 2 == 8/4 -> 8
        "coordX": [0.9, 3.0, 50.0, 12.0, 12.1, 0.0],
        "coordY": [1.0, 0.0, 0.0, 10.0, 10.0, 0.0],
        "coordZ": [-1.0, 0.0, 0.0, 8.0, 10.0, 0.0],
    })
    np.testing.assert_array_equal(match_diameters(cand, ann), [4.0, 20.0, 0.0, 8.0, 0.0, 0.0])


def _data_root(tmp_path):
    geo = Geometry([0, 0, 0], [1, 1, 1])
    for subset, uid in [("subset0", "1.1"), ("subset0", "1.3"), ("subset1", "1.2")]:
        write_scan(tmp_path / subset / f"{uid}.mhd", np.zeros((2, 2, 2), np.int16), geo)
    write(tmp_path, "seriesuid,coordX,coordY,coordZ,class\n"
          "1.1,1,1,1,1\n9.9,0,0,0,0\n1.2,5,5,5,0\n9.9,1,1,1,1\n1.3,0,0,0,0\n")
    write(tmp_path, "seriesuid,coordX,coordY,coordZ,diameter_mm\n1.1,1.5,1,1,6\n", "annotations.csv")
    return tmp_path


def test_candidates_table_keeps_order_and_reports_missing_scans(tmp_path) -> None:
    root = _data_root(tmp_path)
    scans = {"1.1": ScanFile("1.1", "subset0", root), "1.2": ScanFile("1.2", "subset1", root),
             "1.3": ScanFile("1.3", "subset0", root)}
    table, report = build_candidates_table(root / "candidates.csv", root / "annotations.csv", scans)
    assert table["candidate_id"].tolist() == [0, 2, 4]
    assert table["series_uid"].tolist() == ["1.1", "1.2", "1.3"]
    assert table["subset"].tolist() == ["subset0", "subset1", "subset0"]
    assert table["is_nodule"].tolist() == [1, 0, 0]
    assert table["diameter_mm"].tolist() == [6.0, 0.0, 0.0]
    assert report.n_missing_scan_rows == 2 and report.missing_scans == ["9.9"]
    assert "2 candidate rows left out" in report.lines()[1]


def test_candidates_app_writes_tsv(tmp_path, caplog) -> None:
    root = _data_root(tmp_path)
    out = tmp_path / "results" / "candidates.tsv"
    assert CandidatesApp(["--root", str(root), "--out", str(out)]).main() == 0
    df = read_candidates_tsv(out)
    assert list(df.columns) == ["candidate_id", "series_uid", "subset", "coord_x", "coord_y", "coord_z",
                                "is_nodule", "diameter_mm"]
    assert df["candidate_id"].tolist() == [0, 2, 4]
    assert "2 candidate rows left out" in caplog.text
    # only subset1 selected: the other rows are counted as missing
    assert CandidatesApp(["--root", str(root), "--subsets", "subset1", "--out", str(out)]).main() == 0
    assert read_candidates_tsv(out)["series_uid"].tolist() == ["1.2"]


def test_candidates_app_bad_csv_exits_2(tmp_path, capsys) -> None:
    root = _data_root(tmp_path)
    write(root, "seriesuid,coordX,coordY,coordZ,class\n1.1,x,1,1,1\n")
    assert CandidatesApp(["--root", str(root), "--out", str(tmp_path / "c.tsv")]).main() == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("candidates.csv:2: column coordX is not a finite number: 'x'")
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "c.tsv").exists()


def test_candidates_predict_only_has_nan_is_nodule(tmp_path, caplog) -> None:
    root = _data_root(tmp_path)
    write(root, "seriesuid,coordX,coordY,coordZ\n1.1,1,1,1\n", "list.csv")
    out = tmp_path / "c.tsv"
    with caplog.at_level("INFO", logger="luna.candidates"):
        assert CandidatesApp(["--root", str(root), "--candidates", "list.csv", "--annotations", "", "--out",
                              str(out)]).main() == 0
    # said, not "(0 positive)": such a list fails luna-train only after every crop
    assert "1 candidate rows read, 1 refer to the 3 scans on disk (no class column: unlabelled)" in caplog.text
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "the candidates have no class column: fit for luna-predict, not for luna-train"]
    assert out.read_text().splitlines()[1].split("\t")[6] == "NaN"  # undefined, as every TSV of the pipeline
    assert read_candidates_tsv(out)["is_nodule"].isna().all()
    # the crop stage takes that table as it is: the candidate unlabelled (-1) in the store
    store_path = tmp_path / "crops" / "subset0.h5"
    assert CropApp(["--candidates", str(out), "--root", str(root), "--subset", "subset0", "--out",
                    str(store_path), "--shape", "16", "16", "16"]).main() == 0
    store = CropStore(store_path)
    assert store.table["is_nodule"].tolist() == [-1] and len(store) == 1


def test_candidates_app_without_any_scan_exits_2(tmp_path, capsys) -> None:
    """No scan under the root (a wrong --root or --subsets) is an error, not a header-only table."""
    root = tmp_path / "data"
    (root / "subset0").mkdir(parents=True)
    write(root, "seriesuid,coordX,coordY,coordZ,class\n1.1,1,1,1,1\n")
    assert CandidatesApp(["--root", str(root), "--annotations", "", "--out", str(tmp_path / "c.tsv")]).main() == 2
    assert capsys.readouterr().err == (f"luna-candidates: error: {root / 'subset0'}: no <series_uid>.mhd scan in "
                                       "this subset folder\n")
    assert not (tmp_path / "c.tsv").exists()


def test_candidates_app_with_no_row_on_a_scan_on_disk_exits_2(tmp_path, capsys) -> None:
    """Scans named otherwise than the CSV's UIDs: an error now, not empty stores and a failed training later."""
    root = _data_root(tmp_path)
    write(root, "seriesuid,coordX,coordY,coordZ,class\n9.8,1,1,1,1\n9.9,1,1,1,0\n", "other.csv")
    out = tmp_path / "c.tsv"
    assert CandidatesApp(["--root", str(root), "--candidates", "other.csv", "--annotations", "", "--out",
                          str(out)]).main() == 2
    err = capsys.readouterr().err
    assert err.endswith(f"luna-candidates: error: {root / 'other.csv'}: none of its 2 rows names one of the 3 scans "
                        "on disk (the CSV names e.g. 9.8, 9.9; on disk e.g. 1.1, 1.2)\n")
    assert not out.exists()


def test_candidates_out_that_is_an_input_is_refused(tmp_path, capsys) -> None:
    """--out naming the candidate list, the annotations or a file beside the scans overwrote it with the TSV."""
    root = _data_root(tmp_path)
    before = {name: (root / name).read_bytes() for name in ("candidates.csv", "annotations.csv")}
    for out, expected in [
        (root / "candidates.csv", f"--out {root / 'candidates.csv'} is the input --candidates {root / 'candidates.csv'}"),
        (root / "annotations.csv", f"--out {root / 'annotations.csv'} is the input --annotations "
                                   f"{root / 'annotations.csv'}"),
        (root / "subset0" / "c.tsv", f"--out {root / 'subset0' / 'c.tsv'} lies in the scan folder {root / 'subset0'}"),
    ]:
        assert CandidatesApp(["--root", str(root), "--out", str(out)]).main() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert {name: (root / name).read_bytes() for name in before} == before
    assert not (root / "subset0" / "c.tsv").exists()
    # a subset the run does not select is a scan folder too (its scan header was replaced by the table); and a
    # symlink loop at --out is one line (a RuntimeError's traceback)
    header = root / "subset1" / "1.2.mhd"
    header_bytes = header.read_bytes()
    (tmp_path / "loop").symlink_to("loop")
    for out, expected in [(header, f"--out {header} lies in the scan folder {root / 'subset1'}"),
                          (tmp_path / "loop", f"--out {tmp_path / 'loop'}: cannot follow the symlink")]:
        assert CandidatesApp(["--root", str(root), "--subsets", "subset0", "--annotations", "",
                              "--out", str(out)]).main() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert header.read_bytes() == header_bytes


def test_an_unclosed_quote_names_its_line(tmp_path) -> None:
    """pandas said "EOF inside string starting at row 4", no line of the file (rows count every line from 0)."""
    path = write(tmp_path, 'seriesuid,coordX,coordY,coordZ,class\n\n1.1,1,1,1,0\n\n1.2,"2,2,2,0\n1.3,3,3,3,0\n')
    with pytest.raises(TableError) as info:
        read_candidates_csv(path)
    assert str(info.value) == (f"{path}:5: a quoted field is not closed (a '\"' without its pair: the field runs to "
                               "the end of the file)")


def test_a_quoted_field_over_several_lines_keeps_the_file_lines(tmp_path) -> None:
    """A quoted note over lines 2-4: the next rows' lines (and so their candidate_id, line - 2) were counted as if
    every record took one line, and an error named line 5 for a value on line 7."""
    text = ('seriesuid,coordX,coordY,coordZ,class,note\n1.1,1,1,1,0,"a note\nover\nthree lines"\n1.2,2,2,2,1,\n'
            '\n1.3,abc,3,3,0,\n')
    with pytest.raises(TableError, match=r"candidates\.csv:7: column coordX is not a finite number: 'abc'"):
        read_candidates_csv(write(tmp_path, text))
    table = read_candidates_csv(write(tmp_path, text.replace("abc", "3")))
    assert table["line"].tolist() == [2, 5, 7]


def test_a_space_before_a_quoted_field_over_several_lines(tmp_path) -> None:
    """pandas reads ', "a' as a quoted field (skipinitialspace); the line count read it as two records."""
    text = 'seriesuid,coordX,coordY,coordZ,class,note\n1.1,1,1,1,0, "a\nnote"\n1.2,abc,2,2,1,\n'
    with pytest.raises(TableError, match=r"candidates\.csv:4: column coordX is not a finite number: 'abc'"):
        read_candidates_csv(write(tmp_path, text))
