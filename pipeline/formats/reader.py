"""Read log files into an events frame, whatever shape the cloud wrote them in.

A file may be one JSON document (an object, an array, or a wrapper such as CloudTrail's
``{"Records": [...]}``, Azure's ``{"records": [...]}``, a Log Analytics ``{"value": [...]}``,
LookupEvents output ``{"Events": [...]}`` or a Logging API ``{"entries": [...]}``) or JSON Lines,
each line itself any of those. gzip is recognised by its magic bytes, not by the file name.
Each record is routed to the first registered format whose ``matches()`` accepts it.
"""

from __future__ import annotations

import gc
import gzip
import logging
import os
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from pipeline.errors import InputError
from pipeline.formats.base import (
    FileResult,
    LogFormat,
    Quarantined,
    RecordError,
    Row,
    Skip,
    registered_formats,
)
from pipeline.schema import empty_events, events_from_rows, parse_times

__all__ = ["iter_files", "read_bytes", "read_paths"]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# Longest raw text kept with a quarantined record.
MAX_RAW_CHARS = 16_384
# Container keys whose list value holds the records, in the order they are tried.
_WRAPPER_KEYS = ("Records", "records", "value", "Events", "entries")


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Yield the files under ``paths`` (files as given, folders recursively, sorted).

    Hidden files and folders (name starting with a dot) are skipped.

    Raises:
        InputError: a path does not exist.
    """
    for item in paths:
        path = Path(item)
        if path.is_file():
            yield path
        elif path.is_dir():
            for root, dirs, files in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith("."):
                        yield Path(root) / name
        else:
            raise InputError(f"log path not found: {path} (check --source or sources[].paths)")


def read_paths(paths: Iterable[str | os.PathLike[str]]) -> FileResult:
    """Read every file under ``paths`` into one result (events deduplicated by event and secret)."""
    results = []
    enabled = gc.isenabled()
    # Parsing creates millions of short-lived objects without reference cycles, so the cyclic
    # garbage collector would run thousands of times and free nothing. It is paused until the
    # files are read.
    gc.disable()
    try:
        for path in iter_files(paths):
            try:
                data = path.read_bytes()
            except OSError as exc:
                result = FileResult(files=1)
                result.quarantined.append(
                    Quarantined(str(path), "unreadable_file", f"cannot read {path}: {exc.strerror}")
                )
                results.append(result)
                continue
            results.append(read_bytes(data, str(path)))
            del data
        return merge_results(results)
    finally:
        if enabled:
            gc.enable()


def merge_results(results: Iterable[FileResult]) -> FileResult:
    """Combine per-file results; rows repeated across files (same event and secret) are kept once.

    The frames are concatenated without copying their Arrow-backed string columns. Duplicates
    are found on a 64-bit hash of ``(event_uid, resource)`` per row, and only rows whose hash
    repeats are compared by value, so no second copy of the key columns is built.
    """
    merged = FileResult()
    frames = []
    hashes = []
    for result in results:
        merged.records += result.records
        merged.files += result.files
        merged.quarantined.extend(result.quarantined)
        merged.skipped.update(result.skipped)
        merged.formats.update(result.formats)
        if len(result.events):
            frames.append(result.events)
            hashes.append(_key_hashes(result.events))
    if not frames:
        return merged
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    del frames
    duplicated = _duplicated_keys(events, np.concatenate(hashes))
    if duplicated.any():
        merged.skipped["duplicate"] += int(duplicated.sum())
        events = events[~duplicated].reset_index(drop=True)
    merged.events = events
    return merged


_KEY_COLUMNS = ["event_uid", "resource"]


def _key_hashes(events: pd.DataFrame) -> np.ndarray:
    return pd.util.hash_pandas_object(events[_KEY_COLUMNS], index=False).to_numpy()


def _duplicated_keys(events: pd.DataFrame, hashes: np.ndarray) -> np.ndarray:
    """Return a mask of the rows whose ``(event_uid, resource)`` appeared in an earlier row."""
    repeated = pd.Series(hashes).duplicated(keep=False).to_numpy()
    duplicated = np.zeros(len(events), dtype=bool)
    if repeated.any():
        # Rows that share a hash are compared by value: a hash collision is not a duplicate.
        candidates = np.flatnonzero(repeated)
        subset = events[_KEY_COLUMNS].iloc[candidates]
        duplicated[candidates] = subset.duplicated(keep="first").to_numpy()
    return duplicated


def read_bytes(data: bytes, origin: str) -> FileResult:
    """Read one file's content (gzip or plain) into a result. Never raises on bad content."""
    result = FileResult(files=1)
    if data[:2] == _GZIP_MAGIC:
        try:
            data = _gunzip(data)
        except (EOFError, OSError, zlib.error) as exc:
            result.quarantined.append(
                Quarantined(origin, "unreadable_file", f"invalid or truncated gzip: {exc}")
            )
            return result
    for fmt in registered_formats():
        fast = fmt.read_fast(data, origin)
        if fast is not None:
            fast.files = 1
            return fast
    rows: list[Row] = []
    for record_origin, record in _iter_records(data, origin, result):
        _route(record, record_origin, rows, result)
    result.events = _rows_to_frame(rows, result)
    return result


def _gunzip(data: bytes) -> bytes:
    """Decompress a gzip file, every member of it.

    The trailer of a single-member file gives the decompressed size (modulo 2**32) and CRC-32.
    Decompressing into one buffer of that size is about twice as fast as letting the buffer
    grow, because each growth step touches fresh memory. A file with several members fails the
    size or CRC check and is decompressed again by :func:`gzip.decompress`.
    """
    size = int.from_bytes(data[-4:], "little")
    crc = int.from_bytes(data[-8:-4], "little")
    # A truncated file has no trailer, so the hint is capped near the largest size text
    # compressed into len(data) bytes plausibly reaches; a short hint only costs speed.
    hint = max(1, min(size, 64 * len(data) + 65_536))
    whole = zlib.decompress(data, wbits=31, bufsize=hint)
    if len(whole) & 0xFFFFFFFF == size and zlib.crc32(whole) == crc:
        # NOTE: a file made of identical members passes this check and reads as one member.
        # Its events are the same, but the records and duplicate counts are lower.
        return whole
    return gzip.decompress(data)


def _iter_records(
    data: bytes, origin: str, result: FileResult
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield (origin, record) for every record in a file, quarantining what is not JSON."""
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        yield from _iter_json_lines(data, origin, result)
        return
    yield from _unwrap(document, origin, "record", result)


def _iter_json_lines(
    data: bytes, origin: str, result: FileResult
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if number == len(lines) and not complete:
                # A blob that is still being appended (Azure PT1H.json) ends mid-record. The
                # record is read whole on a later run, so it is counted here, not quarantined.
                result.skipped["incomplete_last_line"] += 1
                continue
            result.records += 1
            result.quarantined.append(
                Quarantined(
                    f"{origin} line {number}",
                    "invalid_json",
                    f"line {number} is not valid JSON: {exc}",
                    _raw_text(line),
                )
            )
            continue
        yield from _unwrap(value, f"{origin} line {number}", "record", result)


def _unwrap(
    value: Any, origin: str, label: str, result: FileResult
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield the records inside ``value``, descending into arrays and known wrappers."""
    if isinstance(value, list):
        for index, item in enumerate(value, start=1):
            yield from _unwrap(item, f"{origin} {label} {index}", "item", result)
        return
    if isinstance(value, dict):
        for key in _WRAPPER_KEYS:
            items = value.get(key)
            if isinstance(items, list) and _is_wrapper(value, key):
                for index, item in enumerate(items, start=1):
                    item_origin = f"{origin} {key}[{index}]"
                    item = (
                        _unpack_lookup_event(item, item_origin, result) if key == "Events" else item
                    )
                    if item is not None:
                        yield from _unwrap(item, item_origin, "item", result)
                return
        yield origin, value
        return
    result.records += 1
    result.quarantined.append(
        Quarantined(
            origin,
            "invalid_record",
            f"expected a JSON object, found {type(value).__name__}",
            _raw_text(orjson.dumps(value)),
        )
    )


def _is_wrapper(value: Mapping[str, Any], key: str) -> bool:
    # A record can carry a list under one of these names (a Key Vault record has no "records",
    # but a LogEntry could); a wrapper has few other keys.
    others = set(value) - {key}
    allowed = {"nextToken", "NextToken", "nextPageToken", "@odata.context", "ResponseMetadata"}
    return others <= allowed


def _unpack_lookup_event(item: Any, origin: str, result: FileResult) -> Any:
    """Return the CloudTrail record inside a LookupEvents ``Events[]`` item."""
    if not isinstance(item, dict) or "CloudTrailEvent" not in item:
        return item
    inner = item["CloudTrailEvent"]
    if isinstance(inner, dict):
        return inner
    try:
        return orjson.loads(inner)
    except (orjson.JSONDecodeError, TypeError) as exc:
        result.records += 1
        result.quarantined.append(
            Quarantined(
                origin,
                "invalid_json",
                f"field CloudTrailEvent is not a JSON object: {exc}",
                _raw_text(str(inner).encode()),
            )
        )
        return None


def _route(record: Mapping[str, Any], origin: str, rows: list[Row], result: FileResult) -> None:
    result.records += 1
    fmt = _find_format(record)
    if fmt is None:
        result.quarantined.append(
            Quarantined(
                origin,
                "unknown_format",
                "no log format recognised this record "
                f"(top-level keys: {', '.join(sorted(map(str, record))[:12])})",
                _raw_text(orjson.dumps(record)),
            )
        )
        return
    result.formats[fmt.id] += 1
    try:
        produced = fmt.normalize(record, origin)
    except RecordError as exc:
        result.quarantined.append(
            Quarantined(
                origin, "invalid_record", f"{fmt.id}: {exc}", _raw_text(orjson.dumps(record))
            )
        )
        return
    if isinstance(produced, Skip):
        result.skipped[produced.kind] += 1
        return
    rows.extend(produced)


def _find_format(record: Mapping[str, Any]) -> LogFormat | None:
    for fmt in registered_formats():
        try:
            if fmt.matches(record):
                return fmt
        except (AttributeError, TypeError, KeyError):
            continue
    return None


def _rows_to_frame(rows: list[Row], result: FileResult) -> pd.DataFrame:
    """Build the frame, quarantining rows whose time is missing or cannot be parsed."""
    if not rows:
        return empty_events()
    _, invalid = parse_times(row.get("time") for row in rows)
    good = []
    rejected_uids: set[str] = set()
    for row, bad in zip(rows, invalid, strict=True):
        if row.get("time") is None or bad:
            if row.get("event_uid") not in rejected_uids:
                rejected_uids.add(row.get("event_uid") or "")
                result.quarantined.append(
                    Quarantined(
                        str(row.get("origin")),
                        "invalid_time",
                        f"event time missing or not a timestamp: {row.get('time')!r}",
                    )
                )
            continue
        good.append(row)
    return events_from_rows(good)


def _raw_text(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "…"
