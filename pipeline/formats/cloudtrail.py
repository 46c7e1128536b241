"""Placeholder: replaced by the cloudtrail format module."""
