"""API-server side: configuration, the admission engine (one pipeline for
both adapters), the sync and ``grpc.aio`` server interceptors,
authenticators, JWKS, the verified-token cache, policy and metrics."""
