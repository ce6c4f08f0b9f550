"""loratune.judge: the judge proto package."""
