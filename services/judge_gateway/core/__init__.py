"""The judge gateway's domain: registry, rubric, parsing, resilience, cache (no gRPC)."""
