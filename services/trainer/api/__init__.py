"""The trainer's gRPC adapter."""
