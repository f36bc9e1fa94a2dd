"""ambient-grpc-auth: authentication for ambient session-message gRPC streams."""

from __future__ import annotations

__version__ = "0.1.0"
