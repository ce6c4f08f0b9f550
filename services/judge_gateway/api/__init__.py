"""The judge gateway's gRPC adapter."""
