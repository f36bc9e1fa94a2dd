"""Runner side (gRPC client): token sources, the environment contract,
interceptors, channels and the session helpers. ``aio/`` holds the
``grpc.aio`` twins under the same module names. Most users need only the
front doors :mod:`ambient_grpc_auth` and :mod:`ambient_grpc_auth.aio`."""
