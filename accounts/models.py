"""Accounts: users are Django's own; API tokens are DRF's ``authtoken``."""
