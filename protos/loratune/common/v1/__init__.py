"""loratune.common.v1: generated code of common.proto, version 1."""
