"""Postgres-native campaign execution kernel: the Python driver."""

# The only place the number is written: pyproject.toml reads it (hatch), and it equals the
# kernel_version() of the last migration (tests/unit/test_freeze.py).
__version__ = "1.8.0"
