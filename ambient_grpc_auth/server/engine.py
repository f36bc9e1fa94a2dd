"""The API server's decision pipeline, written once for both interceptors.

:class:`AuthEngine` decides every call; the sync and ``grpc.aio``
interceptors only translate its decisions into gRPC. The pipeline, in order:

:meth:`AuthEngine.admit` ``(method, metadata, handler)``, before any handler
work:

1. **Bypass.** A method the bypass selector exempts (health checks and
   reflection by default) is served unchecked: :attr:`Pass.BYPASSED`. Its
   streaming calls still take a slot (:meth:`AuthEngine.open_bypassed_stream`),
   all of them as one anonymous caller: peers without a token hold, all
   together, at most ``max_streams_per_principal`` worker threads or tasks.
2. **Bearer.** Exactly one ``authorization: Bearer <token>`` value, bounded
   in size; anything else is UNAUTHENTICATED.
3. **Verified-token cache**, keyed by a digest of the whole header value: a
   hit yields the already classified caller without parsing or verifying.
4. **Authenticator chain** (cache misses only). ``admit`` returns a
   :class:`Verification`, the one step that may wait on I/O (a key fetch):
   the adapter completes it with :meth:`Verification.verify` (may block) or
   ``await`` :meth:`Verification.verify_async` (never blocks the event loop),
   and gets the decision of the steps below.
5. **Classification**: user, service, or runner scoped to one session
   (:class:`~ambient_grpc_auth.server.policy.CallerClassifier`). The caller
   is cached until the token's ``exp``.
6. **Unknown method.** Without a handler, :attr:`Pass.UNIMPLEMENTED`: gRPC
   answers UNIMPLEMENTED, to authenticated callers only.
7. **Method rule.** A denying rule answers PERMISSION_DENIED.
8. **Admission.** An :class:`Admission` carries the principal and the
   request phase; the adapter runs the handler with the principal current
   (:func:`ambient_grpc_auth.principal.current_principal`). A streaming
   method's handler first takes a slot (:meth:`Admission.open_stream`):
   beyond ``max_streams_per_principal`` streams of its caller, or
   ``max_concurrent_streams`` in all, the call is refused RESOURCE_EXHAUSTED
   ("too many concurrent streams"); the slot is released when the call ends.

:attr:`Admission.check` ``(request)``, inside the wrapped handler, on every
request message, for methods whose rule names a session field:

9. **Session scope.** Service callers are allowed (runners on their own
   session only); a request without a usable session id is denied.
10. **Ownership.** Users are allowed on sessions they own (owner lookup,
    compared as ``(issuer, username)``);
    everyone else, also on sessions that do not exist, gets PERMISSION_DENIED.
    A failing lookup answers UNAVAILABLE.

Once the first request passes, the adapter counts the call as allowed
(:meth:`~ambient_grpc_auth.server.metrics.MetricsHook.allowed`).

Every refusal is a :class:`Denial` from :func:`rejection_status`: a status
code and fixed details. UNAUTHENTICATED means no or bad credentials;
PERMISSION_DENIED means authenticated but not allowed (including sessions
that do not exist, so that existence is not revealed); UNAVAILABLE means the
server could not decide right now (keys or owner lookup unavailable). The
specific reason, a short fixed word, is logged and counted, never sent.

Speed: the common call (a cached token on a method already seen) allocates
nothing here beyond the cache and memo keys: per-method plans and admissions
per (token, method) are remembered, both bounded.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import grpc

from ambient_grpc_auth._bearer import authorization_value, parse_bearer
from ambient_grpc_auth.errors import TokenRejectedError
from ambient_grpc_auth.principal import CallerKind, Identity, Principal
from ambient_grpc_auth.server._streams import StreamLimiter, StreamSlot
from ambient_grpc_auth.server.config import ServerAuthConfig
from ambient_grpc_auth.server.policy import (
    MAX_SESSION_ID_CHARS,
    Access,
    MethodRule,
    owner_access,
    rule_session_id,
    session_access,
)
from ambient_grpc_auth.server.tokencache import token_expiry

__all__ = [
    "Admission",
    "AuthEngine",
    "Decision",
    "Denial",
    "Pass",
    "Verification",
    "rejection_status",
]

# Rejections are logged under the interceptors' name, which operators filter on.
_log = logging.getLogger("ambient_grpc_auth.server.interceptor")

#: Method names whose bypass decision and rule are remembered.
MAX_PLANNED_METHODS = 1024
#: (verified token, method) pairs whose admission is remembered. Each entry
#: holds the principal (already held by the token cache), the request check
#: and the adapter's wrapped handler.
MAX_MEMO_ENTRIES = 4096

Metadata = Iterable[tuple[str, str | bytes]] | None


# --- outcomes ----------------------------------------------------------------


class Denial(NamedTuple):
    """A refusal as the peer sees it (``context.abort(*denial)``).

    Only the four values :func:`rejection_status` returns exist, so details
    are always fixed strings.
    """

    code: grpc.StatusCode
    details: str


_UNAUTH_MISSING = Denial(grpc.StatusCode.UNAUTHENTICATED, "authentication required")
_UNAUTH_INVALID = Denial(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")
_DENIED = Denial(grpc.StatusCode.PERMISSION_DENIED, "permission denied")
_UNAVAILABLE = Denial(grpc.StatusCode.UNAVAILABLE, "authentication temporarily unavailable")
_TOO_MANY_STREAMS = Denial(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many concurrent streams")


def rejection_status(error: TokenRejectedError) -> Denial:
    """The status code and generic details the peer sees for ``error``.

    Details are fixed strings chosen by code; the reason is never included.
    Codes other than PERMISSION_DENIED and UNAVAILABLE become UNAUTHENTICATED,
    so that no rejection can surface as INTERNAL or OK.
    """
    code = error.code
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return _DENIED
    if code is grpc.StatusCode.UNAVAILABLE:
        return _UNAVAILABLE
    if error.reason == "missing":
        return _UNAUTH_MISSING
    return _UNAUTH_INVALID


class Pass(enum.Enum):
    """Serve the service's handler unchanged (``None`` stays ``None``)."""

    #: The bypass selector exempts the method; nothing was checked.
    BYPASSED = "bypassed"
    #: An authenticated caller called a method the server does not implement.
    UNIMPLEMENTED = "unimplemented"


# --- the engine --------------------------------------------------------------


class AuthEngine:
    """The pipeline of one :class:`ServerAuthConfig`; see the module docstring.

    Thread-safe. :meth:`admit` never blocks, so it may run on an event loop;
    only :meth:`Verification.verify` and :attr:`Admission.check` may block
    (key fetch, owner lookup). Use one engine per interceptor: remembered
    admissions carry that interceptor's wrapped handlers.
    """

    def __init__(self, config: ServerAuthConfig) -> None:
        self.config = config
        self.metrics = config.metrics
        self._bypass = config.bypass
        self._authenticator = config.authenticator
        self._classifier = config.classifier
        self._ownership = config.ownership
        self._lookup = config.owner_lookup
        self._lookup_inline = config.owner_lookup_inline
        self._cache = config.token_cache
        self._max_token_bytes = config.max_token_bytes
        # Per-method decisions that do not depend on the caller.
        self._plans: dict[str, tuple[bool, MethodRule]] = {}
        # Admissions of recent (token digest, method) pairs; see _authorized.
        self._memo: dict[tuple[bytes, str], Admission] = {}
        self._memo_lock = threading.Lock()
        self._streams = StreamLimiter(
            per_principal=config.max_streams_per_principal, total=config.max_concurrent_streams
        )
        self._lookup_pool: ThreadPoolExecutor | None = None

    def open_streams(self, principal: Principal | None = None) -> int:
        """Streaming calls open now (of ``principal``, or of everyone)."""
        return self._streams.open_streams(principal)

    def _lookup_executor(self) -> ThreadPoolExecutor:
        # Created on first use: only the aio adapter runs lookups off-thread.
        with self._memo_lock:
            if self._lookup_pool is None:
                self._lookup_pool = ThreadPoolExecutor(
                    max_workers=self.config.owner_lookup_workers,
                    thread_name_prefix="ambient-owner-lookup",
                )
            return self._lookup_pool

    def plan(self, method: str) -> tuple[bool, MethodRule]:
        """``(bypassed, rule)`` for ``method``, remembered for up to
        :data:`MAX_PLANNED_METHODS` method names (beyond that, e.g. under a
        flood of made-up names, computed on every call)."""
        plan = self._plans.get(method)
        if plan is None:
            plan = (bool(self._bypass(method)), self._ownership.rule_for(method))
            if len(self._plans) < MAX_PLANNED_METHODS:
                self._plans[method] = plan
        return plan

    def admit(self, method: str, metadata: Metadata, handler: object | None) -> Decision:
        """Decide a call from its method and metadata (steps 1-8).

        ``handler`` is the service's handler for ``method`` (``None`` when the
        server does not implement it); it is only compared by identity.
        Returns :class:`Pass`, a :class:`Denial` (already logged and counted),
        an :class:`Admission` (never for a ``None`` handler), or, on a
        verified-token cache miss, a :class:`Verification` to complete.
        Never raises for anything a caller sends; never blocks.
        """
        bypassed, rule = self.plan(method)
        if bypassed:
            self.metrics.bypassed()
            return Pass.BYPASSED
        cache = self._cache
        try:
            value = authorization_value(metadata, max_token_bytes=self._max_token_bytes)
            if cache is None:
                return Verification(self, method, rule, handler, parse_bearer(value), None)
            # Keyed by the whole header value, so a hit skips the parse as well
            # as the signature check. Safe: only values that parsed and
            # verified are ever stored.
            key = cache.key_for(value)
            principal = cache.get(key)
            self.metrics.cache(principal is not None)
            if principal is None:
                return Verification(self, method, rule, handler, parse_bearer(value), key)
        except TokenRejectedError as exc:
            return self._deny(method, exc)
        return self._authorized(method, rule, handler, key, principal)

    # --- steps 4-5: after the authenticator ---

    def _verified(self, step: Verification, principal: Principal) -> Pass | Denial | Admission:
        try:
            principal = self._classifier.classify(principal)
        except TokenRejectedError as exc:
            return self._deny(step._method, exc)
        if self._cache is not None and step._key is not None:
            self._cache.put(step._key, principal, token_expiry(principal))
        return self._authorized(step._method, step._rule, step._handler, step._key, principal)

    def _not_verified(self, step: Verification, error: Exception) -> Denial:
        if not isinstance(error, TokenRejectedError):
            # A bug or an unforeseen input in an authenticator must not
            # surface as INTERNAL; the message may quote the token, so only
            # the type is logged.
            _log.error("authenticator failed unexpectedly: %s", type(error).__name__)
            error = TokenRejectedError("authenticator_error")
        return self._deny(step._method, error)

    # --- steps 6-8 ---

    def _authorized(
        self,
        method: str,
        rule: MethodRule,
        handler: object | None,
        key: bytes | None,
        principal: Principal,
    ) -> Pass | Denial | Admission:
        if handler is None:
            return Pass.UNIMPLEMENTED
        if rule.deny:
            denied = TokenRejectedError("method_denied", grpc.StatusCode.PERMISSION_DENIED)
            return self._deny(method, denied, principal)
        if key is None:
            return Admission(self, method, rule, principal, handler)
        # A caller's repeated calls to one method reuse one admission (and the
        # handler the adapter built for it). Compared by identity: a token
        # that left the cache and was verified again, or a service whose
        # handler changed, gets a fresh admission.
        memo_key = (key, method)
        admission = self._memo.get(memo_key)
        if (
            admission is not None
            and admission.principal is principal
            and admission.handler is handler
        ):
            return admission
        admission = Admission(self, method, rule, principal, handler)
        with self._memo_lock:
            memo = self._memo
            memo[memo_key] = admission
            while len(memo) > MAX_MEMO_ENTRIES:
                del memo[next(iter(memo))]
        return admission

    # --- refusals ---

    def _deny(
        self, method: str, error: TokenRejectedError, principal: Principal | None = None
    ) -> Denial:
        """Log and count a rejection; return what the peer sees."""
        denial = rejection_status(error)
        self.metrics.denied(error.reason)
        _log_rejection(method, error.reason, denial, principal)
        return denial

    def open_bypassed_stream(self, method: str) -> StreamSlot | Denial:
        """For a streaming call to a bypassed method, before its handler runs:
        a slot (counted as the anonymous caller's) to release when the call
        ends, or the denial (logged and counted) when a limit is reached."""
        return self._open_stream(method, None)

    def _open_stream(self, method: str, principal: Principal | None) -> StreamSlot | Denial:
        slot = self._streams.acquire(principal)
        if slot is not None:
            return slot
        self.metrics.denied("too_many_streams")
        _log_rejection(method, "too_many_streams", _TOO_MANY_STREAMS, principal)
        return _TOO_MANY_STREAMS

    def _lookup_failed(self, method: str, exc: Exception) -> Denial:
        _log.error("owner lookup failed on %s: %s", method, type(exc).__name__)
        return self._deny(
            method, TokenRejectedError("owner_lookup_failed", grpc.StatusCode.UNAVAILABLE)
        )


def _log_rejection(method: str, reason: str, denial: Denial, principal: Principal | None) -> None:
    """One line per rejection: the method, the caller when authenticated (as
    ``(issuer, username)``, the identity everything is compared by: a name
    alone may belong to several identity providers), the reason and the
    status. Never the token."""
    if principal is None:
        _log.info("rejected %s: %s (%s)", method, reason, denial.code.name)
    else:
        _log.info(
            "rejected %s for %r of %r: %s (%s)",
            method,
            principal.username,
            principal.issuer,
            reason,
            denial.code.name,
        )


class Verification:
    """Step 4 of the pipeline: a token the cache did not know.

    Complete it exactly once, with :meth:`verify` (may block on a key fetch:
    sync servers) or :meth:`verify_async` (never blocks the event loop);
    either returns the decision of steps 5-8, and reports the time since
    the call arrived (:meth:`~ambient_grpc_auth.server.metrics.MetricsHook.verification`).
    The token is not shown in the repr.
    """

    __slots__ = ("_engine", "_handler", "_key", "_method", "_rule", "_start", "_token")

    def __init__(
        self,
        engine: AuthEngine,
        method: str,
        rule: MethodRule,
        handler: object | None,
        token: str,
        key: bytes | None,
    ) -> None:
        self._engine = engine
        self._token = token
        self._method = method
        self._rule = rule
        self._handler = handler
        self._key = key
        self._start = time.perf_counter()

    def verify(self) -> Pass | Denial | Admission:
        """Verify the token and decide the call. May block (key fetch)."""
        engine = self._engine
        try:
            principal = engine._authenticator.authenticate(self._token)
        except Exception as exc:
            decision: Pass | Denial | Admission = engine._not_verified(self, exc)
        else:
            decision = engine._verified(self, principal)
        engine.metrics.verification(time.perf_counter() - self._start)
        return decision

    async def verify_async(self) -> Pass | Denial | Admission:
        """:meth:`verify` without blocking the event loop."""
        engine = self._engine
        try:
            principal = await engine._authenticator.authenticate_async(self._token)
        except Exception as exc:
            decision: Pass | Denial | Admission = engine._not_verified(self, exc)
        else:
            decision = engine._verified(self, principal)
        engine.metrics.verification(time.perf_counter() - self._start)
        return decision

    def __repr__(self) -> str:
        return f"Verification(method={self._method!r})"


class Admission:
    """An authenticated caller admitted to a method (steps 8-10).

    Remembered per (token, method) and shared by concurrent calls, hence
    immutable apart from :attr:`wrapped`. Attributes:

    - ``principal``: the caller, to make current while the handler runs;
    - ``method``: the full method name;
    - ``handler``: the service's handler (never ``None``);
    - ``check``: the request phase, ``check(request) -> Denial | None``, to
      call on every request message; ``None`` when the method's rule reads
      nothing from requests. Calls the owner lookup in the calling thread;
    - ``check_inline``: ``check`` may run on an event loop (the owner lookup
      is configured as non-blocking); otherwise use :meth:`check_async` there;
    - ``wrapped``: a slot for the adapter's handler built from this
      admission, so that later calls reuse it. Two concurrent first calls may
      both build one; either is correct.
    """

    __slots__ = (
        "_engine",
        "_rule",
        "check",
        "check_inline",
        "handler",
        "method",
        "principal",
        "wrapped",
    )

    def __init__(
        self,
        engine: AuthEngine,
        method: str,
        rule: MethodRule,
        principal: Principal,
        handler: object,
    ) -> None:
        self._engine = engine
        self._rule = rule
        self.method = method
        self.principal = principal
        self.handler = handler
        self.check_inline = engine._lookup_inline
        self.wrapped: Any = None
        self.check: Callable[[Any], Denial | None] | None = (
            None if rule.session_field is None else self._bound_check(rule.session_field)
        )

    def open_stream(self) -> StreamSlot | Denial:
        """For a streaming call, before its handler runs: a slot to release
        (idempotently) when the call ends, or the denial (logged and
        counted) when a stream limit is reached."""
        return self._engine._open_stream(self.method, self.principal)

    def _bound_check(self, field_name: str) -> Callable[[Any], Denial | None]:
        """:meth:`decide` with the common outcome (a user's own session, a
        service in scope) reached in a few operations; anything else goes
        through :meth:`decide`, which also logs and counts."""
        decide = self.decide
        principal = self.principal
        if principal.kind is CallerKind.SERVICE:
            scope = principal.session_scope

            def service_check(request: Any) -> Denial | None:
                session_id = getattr(request, field_name, None)
                if (
                    type(session_id) is str
                    and 0 < len(session_id) <= MAX_SESSION_ID_CHARS
                    and (scope is None or scope == session_id)
                ):
                    return None
                return decide(request)

            return service_check
        lookup = self._engine._lookup
        identity = principal.identity
        username = principal.username
        # A bare owner name stands for that name from the default owner issuer.
        bare_owner_ok = principal.issuer == self._engine.config.default_owner_issuer

        def user_check(request: Any) -> Denial | None:
            session_id = getattr(request, field_name, None)
            if (
                lookup is not None
                and type(session_id) is str
                and 0 < len(session_id) <= MAX_SESSION_ID_CHARS
            ):
                try:
                    owner = lookup(session_id)
                except Exception:
                    owner = None  # decide() looks again, and reports the failure
                if owner is not None and (
                    (bare_owner_ok and owner == username)
                    if type(owner) is str
                    else owner == identity
                ):
                    return None
            return decide(request)

        return user_check

    def decide(self, request: object) -> Denial | None:
        """Steps 9-10 for ``request``, the owner lookup in this thread:
        ``None`` when it may proceed, else the denial (logged and counted)."""
        outcome = self._before_owner(request)
        if not isinstance(outcome, str):
            return outcome
        lookup = self._engine._lookup
        try:
            owner = lookup(outcome) if lookup is not None else None
        except Exception as exc:
            return self._engine._lookup_failed(self.method, exc)
        return self._owner_decision(owner)

    async def check_async(self, request: object) -> Denial | None:
        """:meth:`decide` without blocking the event loop: the owner lookup
        runs in the engine's own bounded pool of ``owner_lookup_workers``
        threads (never the loop's default executor) unless configured inline."""
        outcome = self._before_owner(request)
        if not isinstance(outcome, str):
            return outcome
        engine = self._engine
        lookup = engine._lookup
        try:
            if lookup is None:
                owner = None
            elif engine._lookup_inline:
                owner = lookup(outcome)
            else:
                owner = await asyncio.get_running_loop().run_in_executor(
                    engine._lookup_executor(), lookup, outcome
                )
        except Exception as exc:
            return engine._lookup_failed(self.method, exc)
        return self._owner_decision(owner)

    def _before_owner(self, request: object) -> Denial | str | None:
        """Step 9: ``None`` (allowed), a denial, or the session id whose
        owner decides (users)."""
        if self._rule.session_field is None:
            return None
        session_id = rule_session_id(self._rule, request)
        access = session_access(self.principal, session_id)
        if access is Access.ALLOW:
            return None
        if isinstance(access, str):
            denied = TokenRejectedError(access, grpc.StatusCode.PERMISSION_DENIED)
            return self._engine._deny(self.method, denied, self.principal)
        assert isinstance(session_id, str)
        return session_id

    def _owner_decision(self, owner: Identity | str | None) -> Denial | None:
        """Step 10, once the owner is known."""
        reason = owner_access(self.principal, owner, self._engine.config.default_owner_issuer)
        if reason is None:
            return None
        denied = TokenRejectedError(reason, grpc.StatusCode.PERMISSION_DENIED)
        return self._engine._deny(self.method, denied, self.principal)

    def __repr__(self) -> str:
        return f"Admission(method={self.method!r}, principal={self.principal!r})"


#: What :meth:`AuthEngine.admit` returns.
Decision = Pass | Denial | Admission | Verification
