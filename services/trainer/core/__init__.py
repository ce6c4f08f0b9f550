"""The trainer's domain: data, balancing, models, the training loop, jobs (no gRPC)."""
