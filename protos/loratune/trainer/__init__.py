"""loratune.trainer: the trainer proto package."""
