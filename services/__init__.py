"""loratune's gRPC services."""
