"""Log formats: one module per provider format, each registered for record-by-record routing.

Importing this package registers the built-in formats in routing order.
"""

from pipeline.formats import azure_keyvault, cloudtrail, gcp_audit
from pipeline.formats.base import (
    FileResult,
    LogFormat,
    Quarantined,
    RecordError,
    Skip,
    get_format,
    register,
    registered_formats,
)
from pipeline.formats.reader import read_bytes, read_paths

__all__ = [
    "FileResult",
    "LogFormat",
    "Quarantined",
    "RecordError",
    "Skip",
    "azure_keyvault",
    "cloudtrail",
    "gcp_audit",
    "get_format",
    "read_bytes",
    "read_paths",
    "register",
    "registered_formats",
]
