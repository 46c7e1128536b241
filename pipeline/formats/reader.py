"""Read log files into an events frame, whatever shape the cloud wrote them in.

A file may be one JSON document (an object, an array, or a wrapper such as CloudTrail's
``{"Records": [...]}``, Azure's ``{"records": [...]}``, a Log Analytics ``{"value": [...]}``,
LookupEvents output ``{"Events": [...]}`` or a Logging API ``{"entries": [...]}``) or JSON Lines,
each line itself any of those. gzip is recognised by its magic bytes, not by the file name.
UTF-8 (with or without a byte order mark), UTF-16 and UTF-32 are read. Bytes that are not valid
UTF-8 are not replaced: the file or line that contains them is quarantined as
``invalid_encoding`` with the byte offset, because a replaced character would silently change
a secret or principal name. A file that does not start with ``{`` or ``[`` is quarantined once,
as ``not_json``. Each record is routed to the first registered format whose ``matches()``
accepts it.
"""

from __future__ import annotations

import codecs
import ctypes
import gc
import gzip
import logging
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson
import pandas as pd

from pipeline.errors import InputError
from pipeline.formats.base import (
    BatchResult,
    FastBatch,
    FileResult,
    LogFormat,
    Quarantined,
    RecordError,
    Row,
    Skip,
    registered_formats,
)
from pipeline.formats.fields import json_type
from pipeline.schema import empty_events, events_from_rows, parse_times

__all__ = [
    "EARLIEST_EVENT_TIME",
    "MAX_FUTURE_SKEW",
    "BatchReader",
    "iter_files",
    "read_bytes",
    "read_paths",
]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
# Maximum length of the raw text kept with a quarantined record.
MAX_RAW_CHARS = 16_384
# Container keys whose list value contains the records, in the order they are tried.
_WRAPPER_KEYS = ("Records", "records", "value", "Events", "entries")
# Maximum arrays and wrappers unwrapped around one record. The shapes above nest at most three
# deep (a JSON Lines line that is an array of wrappers), so a deeper value is quarantined.
_MAX_NESTING: Final = 4

EARLIEST_EVENT_TIME: Final = pd.Timestamp("2006-01-01", tz="UTC")
"""Event times before this are quarantined: no cloud audit log is older (AWS opened in 2006)."""
MAX_FUTURE_SKEW: Final = pd.Timedelta(days=1)
"""How far past this host's clock an event time may lie. Writers' clocks drift by seconds to
minutes, and a local time mislabelled as UTC is off by at most 14 hours, so one day accepts
those and still rejects placeholder dates such as 9999-12-31."""

# The events frame of per-file results that only contain counts. Nothing modifies it.
_SHARED_EMPTY: Final = empty_events()

# Rows of record-path files are collected across files and turned into one frame per batch,
# because building a typed 32-column frame has a fixed cost of several milliseconds.
BATCH_ROWS: Final = 50_000
# Smallest decompressed file that BatchReader hands to a per-file fast path (a format without
# a fast-path batch). Such a fast path builds one frame per file, about 2 ms, while the batched
# record path costs about 30 µs per record, so below roughly 60 records (about 64 KiB of
# CloudTrail JSON) the record path is faster. Measured on sample_logs CloudTrail files with
# pyarrow 26 and pandas 3.1 on one core. Fast-path batches take files of any size: on gzip'd
# CloudTrail files of 5 records each, the CloudTrail batch read 20,000 records in 0.43 s and
# the record path in 1.13 s.
FAST_PATH_MIN_BYTES: Final = 65_536
# Records that BatchReader collects in a format's fast-path batch before building their frame.
# An Arrow call costs about as much for 5,000 rows as for 20,000, so a batch of several files is
# faster than a frame per file. A batch's decoded fields and intermediate arrays add to the peak
# memory: on benchmarks/ingest.py (1M records, one core, pyarrow 26) batches of 20,000 to 50,000
# records ran at about the same speed, and 20,000 had the lowest peak.
FAST_BATCH_RECORDS: Final = 20_000

_NON_WHITESPACE: Final = re.compile(rb"\S")
# Byte order marks, longest first: the UTF-32 LE mark starts with the UTF-16 LE one.
_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _find_malloc_trim() -> Callable[[int], int] | None:
    """Return glibc's ``malloc_trim``, or None on other platforms and C libraries."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        # musl and other C libraries have no malloc_trim.
        return None
    return trim


_MALLOC_TRIM: Final = _find_malloc_trim()


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
    reader = BatchReader()
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
                reader.add_unreadable(str(path), f"cannot read {path}: {exc.strerror}")
                continue
            reader.add(data, str(path))
            del data
        return reader.finish()
    finally:
        if enabled:
            gc.enable()


class BatchReader:
    """Read many files into one result, building frames for many files at once.

    Each file goes to the first format whose fast path takes it. A format with a
    :meth:`~pipeline.formats.base.LogFormat.fast_batch` collects files until it contains
    ``fast_batch_records`` records and then builds one frame. Other fast paths build a frame per
    file, and only for files of at least ``fast_path_min_bytes``. Rows from the record path are
    collected across files and turned into a frame every ``batch_rows`` rows. Both paths produce
    the same events, so the sizes only decide speed and memory. Events and quarantine entries
    stay in file order: a file that does not join the pending fast-path batch makes that batch
    build first, and pending record-path rows become a frame before a fast-path frame is added.
    """

    def __init__(
        self,
        batch_rows: int = BATCH_ROWS,
        fast_path_min_bytes: int = FAST_PATH_MIN_BYTES,
        fast_batch_records: int = FAST_BATCH_RECORDS,
    ) -> None:
        self._batch_rows = batch_rows
        self._fast_path_min_bytes = fast_path_min_bytes
        self._fast_batch_records = fast_batch_records
        self._results: list[FileResult] = []
        self._rows = _RowBatch()
        self._batches: dict[str, FastBatch | None] = {}
        # The batch that contains files now, and their content in case the record path reads them.
        # The content as read, often gzip'd, is kept: it is smaller than the text.
        self._pending: FastBatch | None = None
        self._pending_files: list[tuple[bytes, str]] = []

    def add(self, data: bytes, origin: str) -> None:
        """Read one file's content (gzip or plain); bad content is quarantined, never raised."""
        result = FileResult(events=_SHARED_EMPTY, files=1)
        text = _prepare(data, origin, result)
        if text is not None:
            fast = self._read_fast(data, text, origin)
            if fast is True:
                return
            if isinstance(fast, FileResult):
                self._flush_fast_batch()
                self._append_frame(fast)
                return
        self._flush_fast_batch()
        if text is not None:
            _read_records(text, origin, self._rows, result)
        self._append_counts(result)

    def add_unreadable(self, origin: str, detail: str) -> None:
        """Count a file that could not be read, quarantined as ``unreadable_file``."""
        self._flush_fast_batch()
        result = FileResult(events=_SHARED_EMPTY, files=1)
        result.quarantined.append(Quarantined(origin, "unreadable_file", detail))
        self._results.append(result)

    def finish(self) -> FileResult:
        """Return the merged result of every file added (duplicates skipped)."""
        self._flush_fast_batch()
        if self._rows.rows:
            self._results.append(self._rows.flush())
        if _MALLOC_TRIM is not None:
            # The intermediate arrays and Python objects of each batch were freed between the
            # frames kept, and glibc keeps such holes in its heap. Returning them before the
            # merge allocates lowers the peak. Trimming after every batch lowered it further but
            # cost more time, because the next batch faulted the pages in again.
            _MALLOC_TRIM(0)
        merged = merge_results(self._results)
        self._results = []
        return merged

    def _read_fast(self, data: bytes, text: bytes, origin: str) -> FileResult | bool:
        """Add a file to a fast-path batch (True) or read it with a per-file fast path.

        False sends the file to the record path, as None from :func:`_read_fast` does.
        """
        for fmt in registered_formats():
            if fmt.id not in self._batches:
                self._batches[fmt.id] = fmt.fast_batch()
            batch = self._batches[fmt.id]
            if batch is None:
                if len(text) < self._fast_path_min_bytes:
                    continue
                fast = _read_fast_with(fmt, text, origin)
                if fast is None:
                    continue
                return fast if isinstance(fast, FileResult) else False
            if batch is not self._pending:
                self._flush_fast_batch()
            try:
                accepted = batch.add(text, origin)
            except Exception as exc:
                _log_fast_path_decline(fmt.id, origin, exc)
                return False
            if not accepted:
                continue
            self._pending = batch
            self._pending_files.append((data, origin))
            if batch.records >= self._fast_batch_records:
                self._flush_fast_batch()
            return True
        return False

    def _flush_fast_batch(self) -> None:
        """Build the pending fast-path batch; files it declines are read record by record."""
        batch, files = self._pending, self._pending_files
        if batch is None:
            return
        self._pending = None
        self._pending_files = []

        try:
            built = batch.finish()
        except Exception as exc:
            _log_fast_path_decline("fast path batch", f"{len(files)} files", exc)
            built = BatchResult([None] * len(files), empty_events(), np.zeros(0, dtype=np.int64))
        results = list(built.files)
        if len(built.events):
            implausible = _implausible_times(built.events["time"])
            for index in np.unique(built.row_files[implausible]).tolist():
                logger.debug("fast path declined %s: event time out of range", files[index][1])
                results[index] = None

        if None not in results:
            if len(built.events):
                self._append_frame(FileResult(events=built.events))
            self._results.extend(result for result in results if result is not None)
            return

        # The rows of file i are bounds[i]:bounds[i + 1], because row_files is ascending.
        bounds = np.searchsorted(built.row_files, np.arange(len(results) + 1)).tolist()
        segment_start = 0
        for index, result in enumerate(results):
            if result is not None:
                self._results.append(result)
                continue
            self._append_rows(built.events, bounds[segment_start], bounds[index])
            segment_start = index + 1
            data, origin = files[index]
            counts = FileResult(events=_SHARED_EMPTY, files=1)
            text = _prepare(data, origin, counts)
            if text is not None:
                _read_records(text, origin, self._rows, counts)
            self._append_counts(counts)
        self._append_rows(built.events, bounds[segment_start], bounds[-1])

    def _append_rows(self, events: pd.DataFrame, start: int, stop: int) -> None:
        if stop > start:
            rows = events.iloc[start:stop].reset_index(drop=True)
            self._append_frame(FileResult(events=rows))

    def _append_frame(self, result: FileResult) -> None:
        """Add a result with a frame, after the pending record-path rows."""
        if self._rows.rows:
            self._results.append(self._rows.flush())
        self._results.append(result)

    def _append_counts(self, result: FileResult) -> None:
        """Add a record-path file's counts; its rows wait in the row batch."""
        self._results.append(result)
        if len(self._rows.rows) >= self._batch_rows:
            self._results.append(self._rows.flush())


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
            # Hashed per frame: hashing the merged frame dictionary-encodes every event id at
            # once, about 200 MB more at the peak for a million rows.
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
    duplicated = np.zeros(len(events), dtype=bool)
    # A sorted copy takes 8 bytes per row; a hash table of a million rows took about 34 MB.
    ordered = np.sort(hashes)
    if not (ordered[1:] == ordered[:-1]).any():
        return duplicated
    del ordered
    order = np.argsort(hashes, kind="stable")
    same = hashes[order[1:]] == hashes[order[:-1]]
    repeated = np.zeros(len(hashes), dtype=bool)
    repeated[order[1:][same]] = True
    repeated[order[:-1][same]] = True
    # Rows that share a hash are compared by value: a hash collision is not a duplicate.
    candidates = np.flatnonzero(repeated)
    subset = events[_KEY_COLUMNS].iloc[candidates]
    duplicated[candidates] = subset.duplicated(keep="first").to_numpy()
    return duplicated


def read_bytes(data: bytes, origin: str) -> FileResult:
    """Read one file's content (gzip or plain) into a result. Never raises on bad content."""
    rows = _RowBatch()
    result = _read_file(data, origin, rows, fast_path_min_bytes=0)
    if result.events is _SHARED_EMPTY:
        result.events = empty_events()
    if rows.rows:
        batch = rows.flush()
        result.events = batch.events
        result.quarantined.extend(batch.quarantined)
    return result


def _read_file(data: bytes, origin: str, rows: _RowBatch, fast_path_min_bytes: int) -> FileResult:
    """Read one file: a fast-path result with its frame, or counts with the rows put in ``rows``.

    A record-path result shares one empty frame with the others, because copying a fresh one
    costs a tenth of a millisecond per file. Callers that return it replace it.
    """
    result = FileResult(events=_SHARED_EMPTY, files=1)
    text = _prepare(data, origin, result)
    if text is None:
        return result
    fast = _read_fast(text, origin) if len(text) >= fast_path_min_bytes else None
    if fast is not None:
        return fast
    _read_records(text, origin, rows, result)
    return result


def _prepare(data: bytes, origin: str, result: FileResult) -> bytes | None:
    """Return a file's JSON text as UTF-8, or None when it is blank or quarantined in ``result``."""
    if data[:2] == _GZIP_MAGIC:
        try:
            data = _gunzip(data)
        except (EOFError, OSError, zlib.error) as exc:
            result.quarantined.append(
                Quarantined(origin, "unreadable_file", f"invalid or truncated gzip: {exc}")
            )
            return None
    decoded = _to_utf8(data, origin)
    if isinstance(decoded, Quarantined):
        result.quarantined.append(decoded)
        return None
    first = _NON_WHITESPACE.search(decoded)
    if first is None:
        return None
    if decoded[first.start() : first.start() + 1] not in (b"{", b"["):
        result.quarantined.append(
            Quarantined(
                origin,
                "not_json",
                f"file is not JSON or JSON Lines: it starts with {_escape(decoded[:24])}",
            )
        )
        return None
    return decoded


def _read_records(text: bytes, origin: str, rows: _RowBatch, result: FileResult) -> None:
    """Route every record of a file to its format, putting the rows in ``rows``."""
    for record_origin, record in _iter_records(text, origin, result):
        _route(record, record_origin, rows, result)


def _read_fast(data: bytes, origin: str) -> FileResult | None:
    """Return the first format fast path's result, or None to use the record path."""
    for fmt in registered_formats():
        fast = _read_fast_with(fmt, data, origin)
        if fast is not None:
            return fast if isinstance(fast, FileResult) else None
    return None


def _read_fast_with(fmt: LogFormat, data: bytes, origin: str) -> FileResult | bool | None:
    """Return one format's fast-path result, None when it does not read the file, or False.

    False means the file needs the record path. A fast path that raises :class:`RecordError`
    (a value of the wrong type deep in a record) or ``ValueError`` (content it cannot decode),
    or that returns an event time outside the plausible range, is set aside, so the record
    path quarantines those records with their origin and raw text.
    """
    try:
        fast = fmt.read_fast(data, origin)
    except Exception as exc:
        _log_fast_path_decline(fmt.id, origin, exc)
        return False
    if fast is None:
        return None
    if _implausible_times(fast.events["time"]).any():
        logger.debug("%s fast path declined %s: event time out of range", fmt.id, origin)
        return False
    fast.files = 1
    return fast


def _to_utf8(data: bytes, origin: str) -> bytes | Quarantined:
    """Return the content as UTF-8 without a byte order mark, or why it cannot be decoded.

    UTF-16 and UTF-32 are recognised by their byte order mark or, without one, by the NUL bytes
    around the first character, which in JSON is ASCII (RFC 8259 allows no other start).
    """
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8) :]
    encoding = next((name for bom, name in _BOMS if data.startswith(bom)), None)
    if encoding is None:
        encoding = _encoding_from_nul_bytes(data[:4])
    if encoding is None:
        return data
    try:
        return data.decode(encoding).encode("utf-8")
    except UnicodeDecodeError as exc:
        return Quarantined(
            origin,
            "invalid_encoding",
            f"file looks like {encoding.upper()} but byte offset {exc.start} is invalid: "
            f"{exc.reason}",
        )


def _encoding_from_nul_bytes(head: bytes) -> str | None:
    if len(head) >= 4 and head[:3] == b"\0\0\0" and head[3]:
        return "utf-32-be"
    if len(head) >= 4 and head[0] and head[1:4] == b"\0\0\0":
        return "utf-32-le"
    if len(head) >= 2 and head[0] == 0 and head[1]:
        return "utf-16-be"
    if len(head) >= 2 and head[0] and head[1] == 0:
        return "utf-16-le"
    return None


def _escape(head: bytes) -> str:
    """Return leading bytes as printable text: ASCII kept, other bytes as \\xNN escapes."""
    return repr(head)[1:]


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
    yield from _unwrap(document, origin, "record", result, 0)


def _iter_json_lines(
    data: bytes, origin: str, result: FileResult
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    content_lines = sum(1 for line in lines if line.strip())
    parsed_any = False
    offset = 0
    for number, line in enumerate(lines, start=1):
        line_offset = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            last = number == len(lines) and not complete
            if last and _is_appended_tail(line, exc, parsed_any or content_lines > 1):
                # A blob that is still being appended (Azure PT1H.json) ends mid-record. The
                # record is read whole on a later run, so it is counted, not quarantined.
                result.skipped["incomplete_last_line"] += 1
                continue
            result.records += 1
            result.quarantined.append(_invalid_line(line, line_offset, number, origin, exc))
            continue
        parsed_any = True
        yield from _unwrap(value, f"{origin} line {number}", "record", result, 0)


# The start of a whole-file document: an array or a wrapper object.
_WRAPPER_START: Final = re.compile(rb'\A\s*(\[|\{\s*"(Records|records|value|Events|entries)"\s*:)')


def _is_appended_tail(line: bytes, exc: orjson.JSONDecodeError, other_lines: bool) -> bool:
    """Return True when ``line`` is a JSON Lines record cut off by a writer still appending.

    The line must be an object that ends before its JSON does. On its own in a file it must
    also not start like a whole-file document (an array or a ``Records``-style wrapper): such
    a file is one document that is cut or broken, and is quarantined.
    """
    stripped = line.strip()
    if not stripped.startswith(b"{") or exc.pos < len(stripped):
        return False
    return other_lines or not _WRAPPER_START.match(stripped)


def _invalid_line(
    line: bytes, line_offset: int, number: int, origin: str, exc: orjson.JSONDecodeError
) -> Quarantined:
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        offset = line_offset + bad.start
        return Quarantined(
            f"{origin} line {number}",
            "invalid_encoding",
            f"line {number} is not valid UTF-8: byte 0x{line[bad.start]:02x} at byte offset "
            f"{offset} of the file",
            _raw_text(line),
        )
    return Quarantined(
        f"{origin} line {number}",
        "invalid_json",
        f"line {number} is not valid JSON: {exc}",
        _raw_text(line),
    )


def _unwrap(
    value: Any, origin: str, label: str, result: FileResult, depth: int
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Yield the records inside ``value``, descending into arrays and known wrappers."""
    if depth > _MAX_NESTING and isinstance(value, list | dict):
        _quarantine_value(
            value,
            origin,
            f"records nested in more than {_MAX_NESTING} arrays or wrappers",
            result,
        )
        return
    if isinstance(value, list):
        for index, item in enumerate(value, start=1):
            yield from _unwrap(item, f"{origin} {label} {index}", "item", result, depth + 1)
        return
    if isinstance(value, dict):
        for key in _WRAPPER_KEYS:
            items = value.get(key)
            if isinstance(items, list) and _is_wrapper(value, key):
                for index, item in enumerate(items, start=1):
                    item_origin = f"{origin} {key}[{index}]"
                    if key == "Events":
                        item = _unpack_lookup_event(item, item_origin, result)
                        if item is _QUARANTINED:
                            continue
                    yield from _unwrap(item, item_origin, "item", result, depth + 1)
                return
        yield origin, value
        return
    _quarantine_value(value, origin, f"expected a JSON object, found {json_type(value)}", result)


def _quarantine_value(value: Any, origin: str, detail: str, result: FileResult) -> None:
    result.records += 1
    result.quarantined.append(Quarantined(origin, "invalid_record", detail, _record_text(value)))


def _is_wrapper(value: Mapping[str, Any], key: str) -> bool:
    # A record can carry a list under one of these names (a Key Vault record has no "records",
    # but a LogEntry could); a wrapper has few other keys.
    others = set(value) - {key}
    allowed = {"nextToken", "NextToken", "nextPageToken", "@odata.context", "ResponseMetadata"}
    return others <= allowed


# Returned by _unpack_lookup_event for an item it has already quarantined.
_QUARANTINED: Final = object()


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
        return _QUARANTINED


def _log_fast_path_decline(name: str, origin: str, exc: Exception) -> None:
    """Log why a fast path gave a file back to the record path.

    RecordError (a value of the wrong type deep in a record) and ValueError (content it cannot
    decode, such as a byte that is not UTF-8 in a nested part kept raw) are expected. Anything
    else is a bug in the fast path; the record path still reads the file, so nothing is lost.
    """
    if isinstance(exc, (RecordError, ValueError)):
        logger.debug("%s declined %s: %s", name, origin, exc)
    else:
        logger.warning(
            "%s failed on %s, read record by record instead: %s: %s",
            name,
            origin,
            type(exc).__name__,
            exc,
        )


def _route(record: Mapping[str, Any], origin: str, rows: _RowBatch, result: FileResult) -> None:
    result.records += 1
    fmt = _find_format(record)
    if fmt is None:
        result.quarantined.append(
            Quarantined(
                origin,
                "unknown_format",
                "no log format recognised this record "
                f"(top-level keys: {', '.join(sorted(map(str, record))[:12])})",
                _record_text(record),
            )
        )
        return
    result.formats[fmt.id] += 1
    try:
        produced = fmt.normalize(record, origin)
    except RecordError as exc:
        result.quarantined.append(
            Quarantined(origin, "invalid_record", f"{fmt.id}: {exc}", _record_text(record))
        )
        return
    except Exception as exc:
        # A record that trips a bug in a format module must not stop the run: it is kept with
        # the error so it can be replayed once the parser is fixed.
        logger.error(
            "log format %s failed on the record at %s: %s: %s",
            fmt.id,
            origin,
            type(exc).__name__,
            exc,
        )
        result.quarantined.append(
            Quarantined(
                origin,
                "parser_error",
                f"{fmt.id} failed: {type(exc).__name__}: {exc}",
                _record_text(record),
            )
        )
        return
    if isinstance(produced, Skip):
        result.skipped[produced.kind] += 1
        return
    rows.add(produced, record)


def _find_format(record: Mapping[str, Any]) -> LogFormat | None:
    for fmt in registered_formats():
        try:
            if fmt.matches(record):
                return fmt
        except (AttributeError, TypeError, KeyError):
            continue
    return None


class _RowBatch:
    """Rows from the record path, each with the record it came from, waiting for a frame."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.records: list[Mapping[str, Any]] = []

    def add(self, rows: list[Row], record: Mapping[str, Any]) -> None:
        self.rows.extend(rows)
        self.records.extend([record] * len(rows))

    def flush(self) -> FileResult:
        """Return a result holding the frame of the pending rows and their time quarantines."""
        result = FileResult(events=_SHARED_EMPTY)
        result.events = _rows_to_frame(self.rows, self.records, result)
        self.rows = []
        self.records = []
        return result


def _rows_to_frame(
    rows: list[Row], records: list[Mapping[str, Any]], result: FileResult
) -> pd.DataFrame:
    """Build the frame, quarantining records whose time is missing, unparseable or implausible.

    A record with several rows is quarantined once, with its raw text.
    """
    if not rows:
        return empty_events()
    values = [row.get("time") for row in rows]
    times, invalid = parse_times(values)
    implausible = _implausible_times(times)
    good = []
    rejected: set[int] = set()
    for row, record, value, bad, out_of_range in zip(
        rows, records, values, invalid, implausible, strict=True
    ):
        if value is None or bad or out_of_range:
            if id(record) not in rejected:
                rejected.add(id(record))
                if out_of_range:
                    detail = (
                        f"event time {value!r} is outside the plausible range: before "
                        f"{EARLIEST_EVENT_TIME:%Y-%m-%d} or more than {MAX_FUTURE_SKEW} "
                        "after this host's clock"
                    )
                else:
                    detail = f"event time missing or not a timestamp: {value!r}"
                result.quarantined.append(
                    Quarantined(
                        str(row.get("origin")), "invalid_time", detail, _record_text(record)
                    )
                )
            continue
        good.append(row)
    return events_from_rows(good)


def _implausible_times(times: pd.Series) -> np.ndarray:
    """Return a mask of the times before :data:`EARLIEST_EVENT_TIME` or too far in the future.

    Missing times are not in the mask. The comparison runs on naive UTC ``datetime64`` values,
    which costs a few microseconds per file where comparing tz-aware timestamps costs about
    a tenth of a millisecond.
    """
    values = times.to_numpy(dtype="datetime64[us]")
    earliest = EARLIEST_EVENT_TIME.tz_convert(None).to_datetime64()
    latest = (pd.Timestamp.now(tz="UTC") + MAX_FUTURE_SKEW).tz_convert(None).to_datetime64()
    # NaT compares False with everything, so missing times stay out of the mask.
    return (values < earliest) | (values > latest)


def _record_text(value: Any) -> str | None:
    """Return a parsed value as truncated JSON text, or None when it cannot be serialized."""
    try:
        return _raw_text(orjson.dumps(value))
    except orjson.JSONEncodeError:
        # NOTE: orjson stops serializing at 254 levels of nesting, so such a value keeps no
        # raw text; its origin still points at the file and line.
        return None


def _raw_text(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_RAW_CHARS else text[:MAX_RAW_CHARS] + "…"
