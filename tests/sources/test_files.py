"""Tests of the files source: listing, checkpoints and unreadable files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.sources import FilesSource
from pipeline.sources.files import NOT_A_REGULAR_FILE
from tests.test_engine import azure_record, cloudtrail_record, gcp_record


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    (root / "nested").mkdir(parents=True)
    (root / "a.json").write_text(
        json.dumps({"Records": [cloudtrail_record(1, time="2026-10-05T08:00:00Z")]}),
        encoding="utf-8",
    )
    (root / "nested" / "b.json").write_text(json.dumps([gcp_record()]), encoding="utf-8")
    (root / ".hidden.json").write_text(json.dumps(azure_record()), encoding="utf-8")
    return root


def test_first_read_takes_every_file(folder: Path) -> None:
    batch = FilesSource("local", [folder]).read({})

    assert batch.files_listed == 2
    assert batch.files_unchanged == 0
    assert batch.result.records == 2
    assert len(batch.result.events) == 2
    assert sorted(batch.checkpoints) == [
        str((folder / "a.json").resolve()),
        str((folder / "nested" / "b.json").resolve()),
    ]
    stat = (folder / "a.json").stat()
    assert batch.checkpoints[str((folder / "a.json").resolve())] == {
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
    }


def test_unchanged_files_skipped(folder: Path) -> None:
    source = FilesSource("local", [folder])
    first = source.read({})

    second = source.read(first.checkpoints)

    assert second.files_listed == 2
    assert second.files_unchanged == 2
    assert second.result.records == 0
    assert second.checkpoints == {}


def test_changed_file_read_again(folder: Path) -> None:
    source = FilesSource("local", [folder])
    first = source.read({})
    path = folder / "a.json"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    second = source.read(first.checkpoints)

    assert second.files_unchanged == 1
    assert list(second.checkpoints) == [str(path.resolve())]
    assert second.result.records == 1


def test_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        FilesSource("local", [tmp_path / "absent"]).read({})
    assert str(caught.value) == (
        f"log path not found: {tmp_path / 'absent'} (check --source or sources[].paths)"
    )


def test_dangling_link_quarantined(folder: Path) -> None:
    (folder / "broken.json").symlink_to(folder / "deleted.json")

    batch = FilesSource("local", [folder]).read({})

    assert batch.files_listed == 3
    assert [q.reason for q in batch.result.quarantined] == ["unreadable_file"]
    assert batch.result.quarantined[0].detail == (
        f"cannot read {folder / 'broken.json'}: No such file or directory"
    )
    # No checkpoint, so the next run tries the file again.
    assert str((folder / "broken.json").resolve()) not in batch.checkpoints


def test_fifo_in_folder_skipped(folder: Path) -> None:
    # Opening a FIFO for reading blocks until a writer appears, so read() returning at all is
    # the check that it was never opened.
    os.mkfifo(folder / "pipe.json")

    batch = FilesSource("local", [folder]).read({})

    assert batch.files_listed == 3
    assert batch.result.skipped[NOT_A_REGULAR_FILE] == 1
    assert batch.result.quarantined == []
    assert batch.result.records == 2
    assert str((folder / "pipe.json").resolve()) not in batch.checkpoints


def test_fifo_as_configured_path_skipped(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.json"
    os.mkfifo(pipe)

    batch = FilesSource("local", [pipe]).read({})

    assert batch.files_listed == 1
    assert batch.result.summary()["skipped_by_kind"] == {NOT_A_REGULAR_FILE: 1}
    assert batch.result.records == 0
    assert batch.checkpoints == {}


def test_symlink_to_regular_file_read(folder: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(azure_record()), encoding="utf-8")
    (folder / "linked.json").symlink_to(target)

    batch = FilesSource("local", [folder]).read({})

    assert batch.files_listed == 3
    assert batch.result.records == 3
    assert batch.result.skipped[NOT_A_REGULAR_FILE] == 0
    assert str(target.resolve()) in batch.checkpoints


def test_symlink_loop_quarantined(folder: Path) -> None:
    loop = folder / "loop"
    loop.mkdir()
    (loop / "self").symlink_to("self")

    batch = FilesSource("local", [folder]).read({})

    assert batch.files_listed == 3
    assert [q.reason for q in batch.result.quarantined] == ["unreadable_file"]
    assert batch.result.quarantined[0].origin == str(loop / "self")
    assert batch.result.quarantined[0].detail == (
        f"cannot read {loop / 'self'}: Too many levels of symbolic links"
    )
    assert batch.result.records == 2


def test_symlink_loop_as_configured_path_quarantined(tmp_path: Path) -> None:
    (tmp_path / "self").symlink_to("self")

    batch = FilesSource("local", [tmp_path / "self"]).read({})

    assert batch.files_listed == 1
    assert [q.reason for q in batch.result.quarantined] == ["unreadable_file"]
    assert batch.checkpoints == {}
