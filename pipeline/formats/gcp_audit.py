"""Placeholder: replaced by the gcp_audit format module."""
