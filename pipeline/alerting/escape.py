"""Escaping and length limits for strings that came from audit logs.

Every string in a finding may have been written by whoever made the API call (a role session
name, a user agent, an error message), so it is untrusted. These helpers make such a string
safe for one output: Slack mrkdwn, a single-line email header, or a terminal.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = [
    "clean_line",
    "escape_mrkdwn",
    "escape_mrkdwn_emphasis",
    "header_text",
    "strip_controls",
    "truncate",
]

# C0 and C1 control characters, DEL, and the Unicode line and paragraph separators. Bidi
# override characters (U+202A-U+202E, U+2066-U+2069) are included because they can make a
# value display in a different order than it is stored.
_CONTROL_RE: Final = re.compile(
    r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
_LINE_BREAK_RE: Final = re.compile(r"[\t\n\r\x0b\x0c\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_SPACES_RE: Final = re.compile(r" {2,}")

# U+02CB MODIFIER LETTER GRAVE ACCENT looks like a backtick but does not open or close a
# Slack code span.
BACKTICK_STANDIN: Final = "\u02cb"


def strip_controls(text: str) -> str:
    """Remove control characters from ``text`` but keep tabs and line feeds."""
    return _CONTROL_RE.sub("", text)


def clean_line(text: str) -> str:
    """Return ``text`` as one line: line breaks and control characters become single spaces."""
    line = _LINE_BREAK_RE.sub(" ", text)
    line = _CONTROL_RE.sub("", line)
    return _SPACES_RE.sub(" ", line).strip()


def escape_mrkdwn(text: str) -> str:
    """Escape an untrusted value for Slack mrkdwn and plain_text.

    ``&``, ``<`` and ``>`` become entities, so ``<!channel>``, ``<@U123>`` and
    ``<http://evil|click>`` show as text instead of a mention or a link. Backticks become
    :data:`BACKTICK_STANDIN` so a value cannot close the code span it is placed in, and line
    breaks become spaces so a value cannot start a new paragraph that looks like ours.
    """
    line = clean_line(text)
    line = line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return line.replace("`", BACKTICK_STANDIN)


# Look-alike characters that Slack mrkdwn does not read as emphasis markers: U+2217 ASTERISK
# OPERATOR, U+02CD MODIFIER LETTER LOW MACRON and U+223C TILDE OPERATOR. Slack has no escape
# character for *bold*, _italic_ and ~strike~.
_EMPHASIS_STANDINS: Final = str.maketrans({"*": "\u2217", "_": "\u02cd", "~": "\u223c"})


def escape_mrkdwn_emphasis(text: str) -> str:
    """Replace ``*``, ``_`` and ``~`` with look-alikes so that a value cannot turn bold,
    italic or struck through where Slack reads mrkdwn (the message's fallback ``text``)."""
    return text.translate(_EMPHASIS_STANDINS)


def truncate(text: str, limit: int) -> str:
    """Shorten ``text`` to at most ``limit`` characters, ending with "… N more characters".

    ``N`` counts the characters removed. The cut never splits a Slack entity such as
    ``&amp;``, and when ``limit`` is too small for the marker the text is cut without one.
    """
    if len(text) <= limit:
        return text
    # The marker is sized for the largest possible N, so the final marker always fits.
    keep = limit - len(f"… {len(text)} more characters")
    if keep <= 0:
        return _cut_outside_entity(text, limit)
    head = _cut_outside_entity(text, keep)
    return f"{head}… {len(text) - len(head)} more characters"


def _cut_outside_entity(text: str, keep: int) -> str:
    head = text[:keep]
    amp = head.rfind("&", max(0, keep - 5))
    if amp != -1 and ";" not in head[amp:]:
        head = head[:amp]
    return head


def header_text(text: str, max_chars: int) -> str:
    """Return ``text`` fit for a single-line email header of at most ``max_chars`` characters.

    Line breaks and control characters become spaces, which rules out header injection, and a
    longer value is cut and ends with "…".
    """
    line = clean_line(text)
    if len(line) <= max_chars:
        return line
    return line[: max_chars - 1].rstrip() + "…"
