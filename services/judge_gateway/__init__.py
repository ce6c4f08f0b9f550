"""The judge gateway: LLM-as-judge through hosted and local providers."""
