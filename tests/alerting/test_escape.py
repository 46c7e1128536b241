"""Escaping and truncation of untrusted log strings."""

from __future__ import annotations

import pytest

from pipeline.alerting.escape import (
    BACKTICK_STANDIN,
    clean_line,
    escape_mrkdwn,
    escape_mrkdwn_emphasis,
    header_text,
    truncate,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<!channel>", "&lt;!channel&gt;"),
        ("<!here|here>", "&lt;!here|here&gt;"),
        ("<@U1>", "&lt;@U1&gt;"),
        ("<#C024BE7LR>", "&lt;#C024BE7LR&gt;"),
        ("<http://a|b>", "&lt;http://a|b&gt;"),
        ("R&D", "R&amp;D"),
        ("&lt;", "&amp;lt;"),
        ("a`b", f"a{BACKTICK_STANDIN}b"),
        ("```block```", BACKTICK_STANDIN * 3 + "block" + BACKTICK_STANDIN * 3),
        ("{{ 7 * 7 }}", "{{ 7 * 7 }}"),
        ("line1\nline2\r\n*fake*", "line1 line2 *fake*"),
        ("plain-name", "plain-name"),
    ],
)
def test_escape_mrkdwn_cases(raw: str, expected: str) -> None:
    assert escape_mrkdwn(raw) == expected


def test_escape_mrkdwn_leaves_no_angle_brackets() -> None:
    escaped = escape_mrkdwn("<<!everyone>> <mailto:x@y|z>")
    assert "<" not in escaped
    assert ">" not in escaped


def test_clean_line_removes_controls_and_bidi() -> None:
    assert clean_line("a\x1b[31mred\x07\u202eb\u2028c\tend ") == "a [31mred b c end"


def test_truncate_short_text_unchanged() -> None:
    assert truncate("abc", 3) == "abc"


def test_truncate_adds_marker_within_limit() -> None:
    text = "x" * 10_000
    result = truncate(text, 3000)
    assert len(result) <= 3000
    kept = result.index("…")
    assert result == "x" * kept + f"… {10_000 - kept} more characters"
    assert result.endswith(" more characters")


def test_truncate_never_splits_entity() -> None:
    text = "a" * 26 + "&amp;" + "b" * 100
    # The marker "… 131 more characters" is 21 characters, leaving 29: the cut falls in &amp;.
    result = truncate(text, 50)
    assert result == "a" * 26 + "… 105 more characters"


def test_truncate_tiny_limit_has_no_marker() -> None:
    assert truncate("abcdefghij", 4) == "abcd"


def test_header_text_one_line_and_capped() -> None:
    assert header_text("Alert\r\nBcc: victim@example.com", 100) == "Alert Bcc: victim@example.com"
    assert header_text("y" * 50, 10) == "y" * 9 + "…"


def test_escape_emphasis_replaces_markers() -> None:
    assert (
        escape_mrkdwn_emphasis("*boss* _x_ ~y~") == "\u2217boss\u2217 \u02cdx\u02cd \u223cy\u223c"
    )


def test_escape_emphasis_plain_text_kept() -> None:
    assert escape_mrkdwn_emphasis("alice read prod/db") == "alice read prod/db"
