"""``grpc.aio`` twins of the runner-side modules, under the same names."""
