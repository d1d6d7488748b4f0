"""Postgres-native campaign execution kernel: the Python driver."""

__version__ = "1.1.0"
