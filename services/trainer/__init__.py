"""The trainer: LoRA / QLoRA training jobs on one accelerator."""
