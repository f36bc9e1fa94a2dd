"""A small reference SessionService behind the interceptor (SQLite store,
in-process notifications, sync and ``grpc.aio`` servicers), used by the CLI's
``session-server``, the demo and the tests."""
