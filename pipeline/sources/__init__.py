"""Log sources: the places raw records are read from (local files and folders for now)."""

from pipeline.sources.files import FilesSource, SourceBatch

__all__ = ["FilesSource", "SourceBatch"]
