"""Log sources: the places raw records are read from.

Each source type has a settings model (validated as one entry of ``sources`` in config.yaml,
distinguished by its ``type`` key) and a class that follows :class:`pipeline.sources.base.Source`.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Tag

from pipeline.sources.azure_blob import AzureBlobSettings, AzureBlobSource
from pipeline.sources.azure_log_analytics import (
    AzureLogAnalyticsSettings,
    AzureLogAnalyticsSource,
)
from pipeline.sources.base import Source, SourceBatch, SourceError, SourceSettings
from pipeline.sources.cloudtrail_lookup import CloudTrailLookupSettings, CloudTrailLookupSource
from pipeline.sources.files import FilesSource, FilesSourceSettings
from pipeline.sources.gcp_logging import GcpLoggingSettings, GcpLoggingSource
from pipeline.sources.s3 import S3CloudTrailSettings, S3CloudTrailSource

__all__ = [
    "AnySourceSettings",
    "FilesSource",
    "FilesSourceSettings",
    "Source",
    "SourceBatch",
    "SourceError",
    "SourceSettings",
    "build_source",
]


def _source_type(value: Any) -> str:
    """Return an entry's ``type``; an entry without one is a files source."""
    if isinstance(value, dict):
        return str(value.get("type", "files"))
    return str(getattr(value, "type", "files"))


AnySourceSettings = Annotated[
    Annotated[FilesSourceSettings, Tag("files")]
    | Annotated[S3CloudTrailSettings, Tag("s3_cloudtrail")]
    | Annotated[CloudTrailLookupSettings, Tag("cloudtrail_lookup")]
    | Annotated[GcpLoggingSettings, Tag("gcp_logging")]
    | Annotated[AzureBlobSettings, Tag("azure_blob")]
    | Annotated[AzureLogAnalyticsSettings, Tag("azure_log_analytics")],
    Discriminator(_source_type),
]
"""One entry of ``sources`` in config.yaml, of any type (``files`` when ``type`` is absent)."""

_CLASSES: dict[str, Any] = {
    "s3_cloudtrail": S3CloudTrailSource,
    "cloudtrail_lookup": CloudTrailLookupSource,
    "gcp_logging": GcpLoggingSource,
    "azure_blob": AzureBlobSource,
    "azure_log_analytics": AzureLogAnalyticsSource,
}


def build_source(settings: SourceSettings) -> Source:
    """Return the source that ``settings`` describe."""
    if isinstance(settings, FilesSourceSettings):
        return FilesSource.from_settings(settings)
    source: Source = _CLASSES[settings.type](settings)
    return source
