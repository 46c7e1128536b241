"""Persistent storage under the state directory: the Parquet event history."""

from pipeline.store.history import History

__all__ = ["History"]
