"""Tests of the Retry-After parser that the Slack and webhook channels share."""

from __future__ import annotations

import datetime as dt
from email.message import Message

import pytest

from pipeline.alerting.channels.base import parse_retry_after, retry_after_header

NOW = dt.datetime(2026, 10, 10, 3, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30", 30.0),
        (" 2.5 ", 2.5),
        ("-4", 0.0),
        ("Sat, 10 Oct 2026 03:01:30 GMT", 90.0),
        ("Sat, 10 Oct 2026 02:00:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after_values(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == seconds


def test_header_from_urllib_message() -> None:
    headers = Message()
    headers["Retry-After"] = "7"

    assert retry_after_header(headers, now=NOW) == 7.0


def test_header_from_slack_sdk_lists() -> None:
    headers = {"retry-after": ["12", "99"], "content-type": ["text/plain"]}

    assert retry_after_header(headers, now=NOW) == 12.0


def test_header_missing_or_empty() -> None:
    assert retry_after_header({"Content-Type": "text/plain"}, now=NOW) is None
    assert retry_after_header({}, now=NOW) is None
    assert retry_after_header(None, now=NOW) is None
    assert retry_after_header({"Retry-After": []}, now=NOW) is None
