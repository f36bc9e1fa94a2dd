"""Shared test configuration. Test support shared by several test folders lives in tests/support/."""

from __future__ import annotations
