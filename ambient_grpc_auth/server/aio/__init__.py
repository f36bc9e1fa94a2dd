"""The ``grpc.aio`` server interceptor (same name as the sync one)."""
