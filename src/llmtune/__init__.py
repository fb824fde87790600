"""llmtune: Hydra-configured LoRA fine-tuning of open LLMs, evaluated honestly."""

__version__ = "0.1.0"
