"""CloudTrail log files in an S3 bucket (boto3). Being built for issue 4."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, ClassVar, Literal

from pydantic import Field

from pipeline.sources.base import SourceBatch, SourceSettings

__all__ = ["S3CloudTrailSettings", "S3CloudTrailSource"]


class S3CloudTrailSettings(SourceSettings):
    """CloudTrail files under ``AWSLogs/`` in one bucket."""

    type: Literal["s3_cloudtrail"] = "s3_cloudtrail"
    bucket: str = Field(min_length=3, max_length=63)
    prefix: str = ""
    accounts: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    organization_id: str | None = None
    lookback_days: int = Field(default=2, ge=0, le=30)
    endpoint_url: str | None = None


class S3CloudTrailSource:
    type: ClassVar[str] = "s3_cloudtrail"

    def __init__(self, settings: S3CloudTrailSettings) -> None:
        self.settings = settings
        self.name = settings.name

    def read(
        self,
        checkpoints: Mapping[str, Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> SourceBatch:
        raise NotImplementedError("the s3_cloudtrail source is not built yet")
