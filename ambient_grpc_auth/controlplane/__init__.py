"""Control plane: the ``/token`` endpoint (with ``/healthz``, JWKS and OIDC
discovery), its configuration, keys, token signing, issuers and replay
protection."""
