"""The bounds of integers an operator or a client hands the store (HTTP and CLI alike).

A larger value is refused where it comes in (a 422 naming the parameter, a usage error naming
the option) instead of surfacing as an ``OverflowError`` from SQLite or "integer out of range"
from PostgreSQL.
"""

from __future__ import annotations

SQL_INT_MAX = 2**31 - 1
"""Fits a 32-bit INTEGER column and a BIGINT OFFSET on every database."""
MAX_OFFSET = SQL_INT_MAX
MAX_VERSION = SQL_INT_MAX
MAX_ROW_ID = 2**63 - 1
"""Row ids (dead letters) are BIGINT on PostgreSQL and 64-bit on SQLite."""
MAX_SECONDS = 100 * 365 * 24 * 3600.0
"""An age in seconds past this is not a date any clock can subtract."""
