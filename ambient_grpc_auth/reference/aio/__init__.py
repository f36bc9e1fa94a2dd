"""The ``grpc.aio`` reference servicer (same name as the sync module)."""
