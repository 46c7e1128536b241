"""keytrail's machinery: formats, sources, enrichment, state, alerting and the run engine."""

__version__ = "0.1.0"
