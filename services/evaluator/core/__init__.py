"""Transport-free evaluator core logic."""
