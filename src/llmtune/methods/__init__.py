"""How a run gets its model (LoRA or full fine-tuning of a language model, prompting baselines, a new classification
head): chosen by the config's `method` node (`_target_`)."""

from llmtune.methods.base import Method, TrainedMethod, method_of
from llmtune.methods.classification_head import ClassificationHead
from llmtune.methods.language_model import LanguageModelTuning, Prompting

__all__ = ["Method", "TrainedMethod", "method_of", "ClassificationHead", "LanguageModelTuning", "Prompting"]
