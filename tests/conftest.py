"""Shared test configuration. Support code used by several test folders: tests/support/."""

from __future__ import annotations
