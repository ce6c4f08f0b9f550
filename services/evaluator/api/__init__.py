"""The evaluator's gRPC adapter: a thin servicer and proto <-> domain conversion."""
