"""The pod-bound proof, control-plane side: who is asking, not only which session.

A ``pod`` proof is a session proof (v1/v2, in ``Authorization``) plus the
runner's projected Kubernetes service-account token in the
:data:`~ambient_grpc_auth.proof.POD_TOKEN_HEADER` header. The token is
verified offline against the cluster issuer's keys (its JWKS, through the
server side's :class:`~ambient_grpc_auth.server.authn.JwtAuthenticator`):
issuer, audience (the control plane's own), expiry and signature. Then the
service account must be the one bound to the proof's session, by a subject
template such as ``system:serviceaccount:{namespace}:session-{session_id}-sa``.

What this defends: a holder of the (public) encryption key can no longer get
a token for any session it names; it needs a service-account token that the
cluster issued for that session's service account, with the control plane as
audience. What it does not: a stolen service-account token works until its
``exp`` (Kubernetes' projected tokens live 10 minutes to a few hours);
verification is offline, so a token of a deleted pod is accepted until then.

Refusals are :class:`~ambient_grpc_auth.errors.ProofError`: 401 for a token
that does not verify (reason ``pod_<why>``, e.g. ``pod_expired``,
``pod_wrong_audience``, ``pod_unknown_issuer``) or is not bound to a pod
(``pod_not_bound``); 403 for a valid token of another session or namespace
(``pod_session_mismatch``, ``pod_namespace``); 503 while the issuer's keys
have never been fetched (``pod_keys_unavailable``). Nothing in them holds
token material.
"""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from dataclasses import dataclass

from ambient_grpc_auth._clock import SYSTEM_CLOCK, Clock
from ambient_grpc_auth.errors import ConfigurationError, ProofError, TokenRejectedError
from ambient_grpc_auth.server.authn import (
    K8S_CA_FILE,
    K8S_DEFAULT_ISSUER,
    K8S_DEFAULT_JWKS_URL,
    K8S_TOKEN_FILE,
    JwtAuthenticator,
    TrustedIssuer,
    kubernetes_issuer,
)
from ambient_grpc_auth.server.jwks import KeysUnavailableError

__all__ = [
    "DEFAULT_POD_AUDIENCE",
    "DEFAULT_SUBJECT_TEMPLATE",
    "MAX_POD_TOKEN_CHARS",
    "PodIdentity",
    "PodProofSettings",
    "PodProofVerifier",
]

#: The audience runners request their projected token for.
DEFAULT_POD_AUDIENCE = "ambient-control-plane"
#: Which service account runs which session (``{namespace}``, ``{session_id}``).
DEFAULT_SUBJECT_TEMPLATE = "system:serviceaccount:{namespace}:session-{session_id}-sa"
#: Longest service-account token accepted (Kubernetes' are 1-2 KB).
MAX_POD_TOKEN_CHARS = 4096
_SA_PREFIX = "system:serviceaccount:"
_FIELDS = frozenset({"namespace", "session_id"})


@dataclass(frozen=True, kw_only=True)
class PodProofSettings:
    """How the control plane checks pod-bound proofs (immutable).

    ``issuer`` is the cluster's service-account issuer with the control
    plane's audience (:meth:`kubernetes` builds it). ``subject_template``
    maps a session to its service account's username; ``{namespace}`` is the
    token's namespace, which ``namespaces`` restricts (``None``: any
    namespace, so anyone allowed to create a service account of the right
    name in any namespace can obtain that session's token: set it in
    production). ``require_pod_binding`` refuses tokens not bound to a pod
    (e.g. made by ``kubectl create token`` without ``--bound-object-kind``).
    Raises :class:`ConfigurationError` for an invalid template.
    """

    issuer: TrustedIssuer
    subject_template: str = DEFAULT_SUBJECT_TEMPLATE
    namespaces: tuple[str, ...] | None = None
    require_pod_binding: bool = True

    def __post_init__(self) -> None:
        if self.namespaces is not None:
            object.__setattr__(self, "namespaces", tuple(self.namespaces))
            if not self.namespaces or not all(self.namespaces):
                raise ConfigurationError("pod proof: namespaces must be non-empty names")
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.subject_template) if f}
            self.subject_template.format(namespace="ns", session_id="sid")
        except (ValueError, KeyError, IndexError):
            fields = {"?"}
        if "session_id" not in fields or not fields <= _FIELDS:
            raise ConfigurationError(
                "pod proof: the subject template needs {session_id} and may use {namespace}"
            )

    @classmethod
    def kubernetes(
        cls,
        *,
        audience: str = DEFAULT_POD_AUDIENCE,
        issuer: str = K8S_DEFAULT_ISSUER,
        jwks_url: str = K8S_DEFAULT_JWKS_URL,
        ca_file: str | os.PathLike[str] | None = K8S_CA_FILE,
        bearer_token_file: str | os.PathLike[str] | None = K8S_TOKEN_FILE,
        subject_template: str = DEFAULT_SUBJECT_TEMPLATE,
        namespaces: Iterable[str] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> PodProofSettings:
        """Settings for the cluster the control plane runs in (see
        :func:`~ambient_grpc_auth.server.authn.kubernetes_issuer`)."""
        return cls(
            issuer=kubernetes_issuer(
                audiences=audience,
                issuer=issuer,
                jwks_url=jwks_url,
                ca_file=ca_file,
                bearer_token_file=bearer_token_file,
                clock=clock,
            ),
            subject_template=subject_template,
            namespaces=None if namespaces is None else tuple(namespaces),
        )


@dataclass(frozen=True, slots=True)
class PodIdentity:
    """A verified service account: ``username`` is the token's ``sub``."""

    username: str
    namespace: str
    name: str


class PodProofVerifier:
    """Verifies service-account tokens and their binding to a session.

    Thread-safe; :meth:`authenticate` never blocks the event loop (a key
    fetch runs in a worker thread).
    """

    def __init__(self, settings: PodProofSettings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self._authn = JwtAuthenticator(issuers=[settings.issuer], clock=clock)

    async def authenticate(self, token: str) -> PodIdentity:
        """The service account ``token`` was issued to; raises ProofError (401/503)."""
        if len(token) > MAX_POD_TOKEN_CHARS:
            raise ProofError("pod_too_long", 401)
        try:
            principal = await self._authn.authenticate_async(token)
        except KeysUnavailableError:
            raise ProofError("pod_keys_unavailable", 503) from None
        except TokenRejectedError as exc:
            raise ProofError(f"pod_{exc.reason}", 401) from None
        claims = principal.claims
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(_SA_PREFIX):
            raise ProofError("pod_not_a_service_account", 401)
        namespace, sep, name = sub[len(_SA_PREFIX) :].partition(":")
        if not sep or not namespace or not name or ":" in name:
            raise ProofError("pod_not_a_service_account", 401)
        k8s = claims.get("kubernetes.io")
        if k8s is not None and (not isinstance(k8s, dict) or k8s.get("namespace") != namespace):
            raise ProofError("pod_claims_mismatch", 401)
        if self.settings.require_pod_binding:
            pod = k8s.get("pod") if isinstance(k8s, dict) else None
            if not isinstance(pod, dict) or not all(
                isinstance(pod.get(k), str) and pod.get(k) for k in ("name", "uid")
            ):
                raise ProofError("pod_not_bound", 401)
        return PodIdentity(username=sub, namespace=namespace, name=name)

    def check_binding(self, identity: PodIdentity, session_id: str) -> None:
        """Raise ProofError(403) unless ``identity`` is bound to ``session_id``."""
        allowed = self.settings.namespaces
        if allowed is not None and identity.namespace not in allowed:
            raise ProofError("pod_namespace", 403)
        expected = self.settings.subject_template.format(
            namespace=identity.namespace, session_id=session_id
        )
        if identity.username != expected:
            raise ProofError("pod_session_mismatch", 403)

    def __repr__(self) -> str:
        return f"PodProofVerifier(issuer={self.settings.issuer.issuer!r})"
