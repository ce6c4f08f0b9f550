"""loratune.judge.v1: generated code of judge.proto, version 1."""
