"""pipeline.export: CSV, Excel and Parquet files, with formula injection neutralized."""

from __future__ import annotations

import csv
from pathlib import Path

import openpyxl
import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.exports import neutralize_formula

# Text a log can carry -> the text a spreadsheet export must contain.
INJECTION_CASES = [
    ('=HYPERLINK("http://x","y")', '\'=HYPERLINK("http://x","y")'),
    ("+1+1", "'+1+1"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1:A2)", "'@SUM(A1:A2)"),
    ("\tcmd", "'\tcmd"),
    ("\rcmd", "'\rcmd"),
    ("aws-cli/2.15.0", "aws-cli/2.15.0"),
    ("a=b", "a=b"),
    (" =1", " =1"),
    ("", ""),
]


@pytest.mark.parametrize(("text", "expected"), INJECTION_CASES)
def test_neutralize_formula_cases(text: str, expected: str) -> None:
    assert neutralize_formula(text) == expected


def sample_frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_agent": pd.Series([text for text, _ in INJECTION_CASES], dtype="string"),
            "count": [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8],
            "resources": [["=a", "b"]] + [[] for _ in range(9)],
            "evidence": [{"note": "@x", "n": 2}] + [{} for _ in range(9)],
            "time": pd.date_range("2026-10-01T10:00:00Z", periods=10, freq="h"),
        }
    )


def read_csv_rows(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_export_csv_neutralizes_text(tmp_path: Path) -> None:
    path = pipeline.export(sample_frame(), tmp_path / "events.csv")

    rows = read_csv_rows(path)

    assert rows[0] == ["user_agent", "count", "resources", "evidence", "time"]
    assert [row[0] for row in rows[1:]] == [expected for _, expected in INJECTION_CASES]
    assert [row[1] for row in rows[1:3]] == ["-1", "0"]
    assert rows[1][2] == '["=a", "b"]'
    assert rows[1][3] == '{"note": "@x", "n": 2}'
    assert rows[2][2] == "[]"
    assert rows[1][4] == "2026-10-01 10:00:00+00:00"


def test_export_csv_neutralizes_headers_and_index(tmp_path: Path) -> None:
    pivot = pd.DataFrame(
        {"=cmd|' /C calc'!A0": [1, 2]}, index=pd.Index(["-alice", "bob"], name="principal")
    )

    rows = read_csv_rows(pipeline.export(pivot, tmp_path / "pivot.csv"))

    assert rows == [["principal", "'=cmd|' /C calc'!A0"], ["'-alice", "1"], ["bob", "2"]]


def test_export_excel_cells_are_text(tmp_path: Path) -> None:
    frame = sample_frame()
    frame.loc[9, "user_agent"] = "bell\x07here"

    path = pipeline.export(frame, tmp_path / "events.xlsx", sheet_name="events")
    book = openpyxl.load_workbook(path)
    sheet = book["events"]
    cells = [row[0] for row in sheet.iter_rows(min_row=2, max_row=10)]

    # XML turns a carriage return into a newline when the file is read back.
    expected = [text.replace("\r", "\n") for _, text in INJECTION_CASES[:9]]
    assert [cell.value or "" for cell in cells] == expected
    assert {cell.data_type for cell in cells if cell.value} == {"s"}
    assert sheet["A11"].value == "bell\\x07here"
    assert sheet["B2"].value == -1
    assert sheet["C2"].value == '["=a", "b"]'
    assert sheet["E2"].value == pd.Timestamp("2026-10-01T10:00:00").to_pydatetime()


def test_export_parquet_keeps_types(tmp_path: Path) -> None:
    path = pipeline.export(sample_frame(), tmp_path / "events.parquet")

    table = pq.read_table(path)

    assert table.column("user_agent").to_pylist()[0] == INJECTION_CASES[0][0]
    assert table.column("resources").to_pylist()[0] == ["=a", "b"]
    assert table.column("evidence").to_pylist()[:2] == ['{"note": "@x", "n": 2}', "{}"]
    assert str(table.schema.field("time").type) == "timestamp[us, tz=UTC]"


def test_export_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        pipeline.export(sample_frame(), tmp_path / "events.json")

    assert str(caught.value) == (
        f"cannot export to {tmp_path / 'events.json'}: unknown file suffix '.json'; "
        "use one of .csv, .xlsx, .parquet"
    )
    assert list(tmp_path.iterdir()) == []


def test_export_suffix_case_insensitive(tmp_path: Path) -> None:
    path = pipeline.export(sample_frame(), tmp_path / "EVENTS.CSV")

    assert path == tmp_path / "EVENTS.CSV"
    assert len(read_csv_rows(path)) == 11
    assert sorted(item.name for item in tmp_path.iterdir()) == ["EVENTS.CSV"]
