"""Where raw log records come from. Only local files for now."""

from pipeline.sources.files import FilesSource, SourceBatch

__all__ = ["FilesSource", "SourceBatch"]
