"""Azure Key Vault AuditEvent logs in Blob Storage. Being built for issue 4."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pipeline.sources.base import SourceBatch, SourceSettings

__all__ = ["AzureBlobSettings", "AzureBlobSource"]


class AzureBlobSettings(SourceSettings):
    """The diagnostic-settings container of one storage account."""

    type: Literal["azure_blob"] = "azure_blob"
    account_url: str | None = None
    container: str = "insights-logs-auditevent"


class AzureBlobSource:
    type: ClassVar[str] = "azure_blob"

    def __init__(self, settings: AzureBlobSettings) -> None:
        self.settings = settings
        self.name = settings.name

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        raise NotImplementedError("the azure_blob source is not built yet")
