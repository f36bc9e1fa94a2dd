"""Claim names of the tokens our control plane issues to runners.

The token server writes them; the server interceptor reads them to scope a
runner to its own session. Standard claims (iss, aud, sub, iat, exp, jti) are
as in RFC 7519.
"""

from __future__ import annotations

__all__ = ["RUNNER_TOKEN_USE", "SESSION_ID_CLAIM", "TOKEN_USE_CLAIM"]

#: The session the token is scoped to.
SESSION_ID_CLAIM = "session_id"
#: What the token is for; runner tokens carry ``RUNNER_TOKEN_USE``.
TOKEN_USE_CLAIM = "token_use"  # noqa: S105 (a claim name)
RUNNER_TOKEN_USE = "ambient-runner"  # noqa: S105 (a claim value)
