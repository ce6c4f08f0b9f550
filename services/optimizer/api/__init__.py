"""The optimizer's gRPC adapter."""
