"""Shared test configuration. Area-specific fixtures live in tests/_support_*.py."""

from __future__ import annotations
