"""Evaluator service: scores fine-tuned model outputs."""
