"""loratune.optimizer.v1: generated code of optimizer.proto, version 1."""
