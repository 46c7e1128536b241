"""Google Cloud audit log entries through the Cloud Logging API. Being built for issue 4."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.sources.base import SourceBatch, SourceSettings

__all__ = ["GcpLoggingSettings", "GcpLoggingSource"]


class GcpLoggingSettings(SourceSettings):
    """Secret Manager audit log entries of one or more projects."""

    type: Literal["gcp_logging"] = "gcp_logging"
    projects: list[str] = Field(min_length=1)
    api_endpoint: str | None = None


class GcpLoggingSource:
    type: ClassVar[str] = "gcp_logging"

    def __init__(self, settings: GcpLoggingSettings) -> None:
        self.settings = settings
        self.name = settings.name

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        raise NotImplementedError("the gcp_logging source is not built yet")
