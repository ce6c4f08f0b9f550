"""loratune.optimizer: the optimizer proto package."""
