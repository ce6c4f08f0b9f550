"""loratune.evaluator: the evaluator proto package."""
