"""``grpc.aio`` twins of the package's sync modules (same names, same contracts)."""
