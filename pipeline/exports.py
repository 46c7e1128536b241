"""Write a frame to CSV, Excel or Parquet, safe to open in a spreadsheet.

Values in audit logs are written by whoever made the call: a user agent, an error message or a
role session name can start with ``=``. A spreadsheet that opens such a cell as a formula can
run it (CSV injection, also called formula injection). For CSV and Excel, :func:`export` prefixes
every text cell and text header that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage
return with a single quote, which spreadsheets show as text. Numbers stay numbers, so a negative
count is not changed. Parquet is a data format and keeps the text as it is.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["EXCEL_MAX_ROWS", "FORMULA_PREFIXES", "export", "neutralize_formula"]

logger = logging.getLogger(__name__)

FORMULA_PREFIXES: Final = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula."""

EXCEL_MAX_ROWS: Final = 1_048_576
"""Rows in one Excel worksheet, the header row included (Excel 2007 and later)."""

# Characters of C0 control codes that the XML inside an .xlsx file cannot hold (tab, newline and
# carriage return are allowed). openpyxl rejects a string that contains one.
_XML_ILLEGAL: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
# Excel shows at most this many characters in a cell; longer text is cut there by export.
_EXCEL_MAX_CHARS: Final = 32_767

_SUFFIXES: Final = (".csv", ".xlsx", ".parquet")


def neutralize_formula(text: str) -> str:
    """Return ``text`` with a leading ``'`` when a spreadsheet would read it as a formula."""
    return "'" + text if text.startswith(FORMULA_PREFIXES) else text


def export(
    frame: pd.DataFrame, path: str | os.PathLike[str], *, sheet_name: str = "keytrail"
) -> Path:
    """Write ``frame`` to ``path`` as CSV, Excel or Parquet, chosen by the file suffix.

    For ``.csv`` and ``.xlsx``:

    - text cells and column names that start with ``=``, ``+``, ``-``, ``@``, tab or carriage
      return get a leading ``'``;
    - lists and dicts (``resources``, ``evidence``) are written as JSON text;
    - a named or non-default index (a pivot table's row labels) becomes the first columns;
    - Excel cannot store time zones, so times are written as UTC without a zone, and control
      characters that XML cannot hold are written as ``\\xNN``.

    For ``.parquet``, dict columns are written as JSON text, because dicts of different shapes
    fit no single Parquet type. Lists, times and text keep their types.

    The file is written under a temporary name in the same folder and renamed into place, so a
    failed export leaves no half-written file.

    Args:
        frame: any DataFrame, for example events or findings.
        path: the file to write; its suffix (case-insensitive) picks the format.
        sheet_name: the worksheet name for ``.xlsx``.

    Returns:
        The path written.

    Raises:
        ValueError: the suffix is not ``.csv``, ``.xlsx`` or ``.parquet``, or the frame has more
            rows than one Excel worksheet holds.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(
            f"cannot export to {target}: unknown file suffix {target.suffix!r}; "
            f"use one of {', '.join(_SUFFIXES)}"
        )
    if suffix == ".xlsx" and len(frame) + 1 > EXCEL_MAX_ROWS:
        raise ValueError(
            f"cannot export {len(frame)} rows to {target}: an Excel sheet holds "
            f"{EXCEL_MAX_ROWS - 1} rows below its header; export to .parquet or .csv instead"
        )

    writers: dict[str, Callable[[pd.DataFrame, Path], None]] = {
        ".csv": _write_csv,
        ".xlsx": lambda data, file: _write_excel(data, file, sheet_name),
        ".parquet": _write_parquet,
    }
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp{suffix}")
    try:
        writers[suffix](frame, temporary)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    logger.info("exported %s rows to %s", len(frame), target)
    return target


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    table = _spreadsheet_frame(frame, excel=False)
    # CRLF row ends (RFC 4180) make the csv module quote cells that contain a lone CR or LF.
    table.to_csv(path, index=False, encoding="utf-8", lineterminator="\r\n")


def _write_excel(frame: pd.DataFrame, path: Path, sheet_name: str) -> None:
    table = _spreadsheet_frame(frame, excel=True)
    # The engine is named because the temporary file's suffix is not the one pandas looks at.
    table.to_excel(path, index=False, sheet_name=sheet_name, engine="openpyxl")


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    table = _with_index_columns(frame).copy()
    for name in table.columns:
        column = table[name]
        if column.dtype == object and column.map(lambda value: isinstance(value, Mapping)).any():
            table[name] = column.map(_json_or_null)
    arrow = pa.Table.from_pandas(table, preserve_index=False)
    pq.write_table(arrow, path, compression="zstd")


def _spreadsheet_frame(frame: pd.DataFrame, *, excel: bool) -> pd.DataFrame:
    """Return a copy of ``frame`` whose cells and headers are safe text for a spreadsheet."""
    table = _with_index_columns(frame)
    cleaned = {
        position: _spreadsheet_column(table.iloc[:, position], excel=excel)
        for position in range(table.shape[1])
    }
    result = pd.DataFrame(cleaned, index=table.index)
    result.columns = [_cell_text(_header_text(name), excel=excel) for name in table.columns]
    return result.reset_index(drop=True)


def _with_index_columns(frame: pd.DataFrame) -> pd.DataFrame:
    """Turn a meaningful index into columns and join the levels of a column MultiIndex."""
    table = frame
    if not _is_default_index(table.index):
        table = table.reset_index()
    if isinstance(table.columns, pd.MultiIndex):
        table = table.copy()
        table.columns = [
            " / ".join(str(level) for level in key if str(level) != "") for key in table.columns
        ]
    return table


def _is_default_index(index: pd.Index) -> bool:
    if index.name is not None or isinstance(index, pd.MultiIndex):
        return False
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1


def _header_text(name: Any) -> str:
    return name if isinstance(name, str) else str(name)


def _spreadsheet_column(column: pd.Series, *, excel: bool) -> pd.Series:
    """Return ``column`` with text neutralized, nested values as JSON and Excel-safe times."""
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        return column.dt.tz_convert("UTC").dt.tz_localize(None) if excel else column
    if isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype(object)
    if pd.api.types.is_bool_dtype(column.dtype) or pd.api.types.is_numeric_dtype(column.dtype):
        return column
    if pd.api.types.is_datetime64_dtype(column.dtype) or pd.api.types.is_timedelta64_dtype(
        column.dtype
    ):
        return column
    values = column.astype(object).map(lambda value: _cell_value(value, excel=excel))
    return pd.Series(values.to_numpy(dtype=object), index=column.index, dtype=object)


def _cell_value(value: Any, *, excel: bool) -> Any:
    if isinstance(value, Mapping | list | tuple | set | np.ndarray):
        return _cell_text(_json_text(value), excel=excel)
    if isinstance(value, str):
        return _cell_text(value, excel=excel)
    if isinstance(value, pd.Timestamp) and value.tzinfo is not None and excel:
        return value.tz_convert("UTC").tz_localize(None)
    return value


def _cell_text(text: str, *, excel: bool) -> str:
    if not excel:
        return neutralize_formula(text)
    text = neutralize_formula(_XML_ILLEGAL.sub(_escape_control, text))
    if len(text) > _EXCEL_MAX_CHARS:
        text = text[: _EXCEL_MAX_CHARS - 1] + "…"
    return text


def _escape_control(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def _json_text(value: Any) -> str:
    if isinstance(value, np.ndarray | set | tuple):
        value = sorted(value) if isinstance(value, set) else list(value)
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def _json_or_null(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return _json_text(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
