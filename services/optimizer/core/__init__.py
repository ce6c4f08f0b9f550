"""The optimizer's domain: search space, studies, dispatch (no gRPC)."""
