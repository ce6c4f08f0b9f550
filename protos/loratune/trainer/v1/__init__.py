"""loratune.trainer.v1: generated code of trainer.proto, version 1."""
