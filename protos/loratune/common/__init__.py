"""loratune.common: the common proto package."""
