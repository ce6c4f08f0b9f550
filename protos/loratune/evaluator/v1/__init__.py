"""loratune.evaluator.v1: generated code of evaluator.proto, version 1."""
