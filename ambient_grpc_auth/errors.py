"""The library's exceptions: one small hierarchy.

- :class:`TokenUnavailableError` (runner side): a token could not be obtained.
  ``retryable`` says whether trying again later may succeed.
- :class:`TokenRejectedError` (server side): presented credentials were refused.
  ``code`` is the gRPC status the peer sees; ``reason`` is a short, fixed,
  machine-readable word for logs and metrics.
- :class:`ProofError` (control plane): a session proof was refused; ``status``
  is the HTTP status the peer sees.

Messages never contain token, proof or key material: they are built only from
fixed strings, host names, status codes and short excerpts of response bodies
that have been scrubbed of anything that looks like a bearer value.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AmbientAuthError",
    "ConfigurationError",
    "KeyFileError",
    "ProofError",
    "TokenRejectedError",
    "TokenUnavailableError",
]


class AmbientAuthError(Exception):
    """Base class of every exception this library raises on purpose."""


class ConfigurationError(AmbientAuthError, ValueError):
    """Configuration is missing or invalid (bad URL, unsafe plaintext target...)."""


class KeyFileError(AmbientAuthError):
    """A key file is missing, unreadable or malformed."""


class TokenUnavailableError(AmbientAuthError):
    """A token could not be obtained (runner side).

    ``retryable`` is True when the failure is transient (network error, 5xx,
    timeout) and False when retrying cannot help (401/403, bad configuration).
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class TokenRejectedError(AmbientAuthError):
    """Presented credentials were refused (server side).

    ``code`` is what the peer sees (UNAUTHENTICATED or PERMISSION_DENIED) with
    a generic details string; ``reason`` is logged and counted server-side.
    """

    def __init__(
        self, reason: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class ProofError(AmbientAuthError):
    """A session proof presented to the control plane was refused.

    ``status`` is the HTTP status (401 or 403); ``reason`` is a short fixed word.
    """

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
