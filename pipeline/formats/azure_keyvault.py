"""Placeholder: replaced by the azure_keyvault format module."""
