"""CloudTrail LookupEvents for accounts without a trail bucket (boto3). Being built for issue 4."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.sources.base import SourceBatch, SourceSettings

__all__ = ["CloudTrailLookupSettings", "CloudTrailLookupSource"]


class CloudTrailLookupSettings(SourceSettings):
    """Management events of the secret stores through the LookupEvents API."""

    type: Literal["cloudtrail_lookup"] = "cloudtrail_lookup"
    regions: list[str] = Field(min_length=1)
    endpoint_url: str | None = None


class CloudTrailLookupSource:
    type: ClassVar[str] = "cloudtrail_lookup"

    def __init__(self, settings: CloudTrailLookupSettings) -> None:
        self.settings = settings
        self.name = settings.name

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        raise NotImplementedError("the cloudtrail_lookup source is not built yet")
