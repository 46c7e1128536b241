"""Type checks for the fields of provider records, shared by the format modules.

A field that decides who acted, whether the call worked, when, or which secret it touched must
have the JSON type the provider documents. Any other type raises :class:`RecordError`, and the
reader quarantines the record as ``invalid_record`` with the field, the expected type and the
type found. Descriptive fields (user agent, region) of the wrong type become null through
:func:`loose_text`, so a malformed label does not cost the event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.formats.base import RecordError

__all__ = ["expect_array", "expect_object", "expect_string", "json_type", "loose_text"]


def json_type(value: Any) -> str:
    """Return the JSON name of a parsed value's type: object, array, string, number, ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def expect_string(value: Any, field: str) -> str | None:
    """Return a string field's value, None when it is null or empty.

    Raises:
        RecordError: the value is present and not a string.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(field, f"expected a string, found {json_type(value)}")
    return value or None


def expect_object(value: Any, field: str) -> Mapping[str, Any]:
    """Return an object field's value, an empty mapping when it is null.

    Raises:
        RecordError: the value is present and not an object.
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecordError(field, f"expected an object, found {json_type(value)}")
    return value


def expect_array(value: Any, field: str) -> list[Any] | None:
    """Return an array field's value, None when it is null.

    Raises:
        RecordError: the value is present and not an array.
    """
    if value is None:
        return None
    if not isinstance(value, list):
        raise RecordError(field, f"expected an array, found {json_type(value)}")
    return value


def loose_text(value: Any) -> str | None:
    """Return a descriptive string field, None when it is missing, empty or not a string."""
    return value if isinstance(value, str) and value else None
