"""Turn rows into token sequences: the model file gives the prompt format, the method decides where the loss goes."""

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and our masks) skip


@dataclass(frozen=True)
class PromptFormat:
    instruction: str
    prompt_template: str  # uses {instruction} and {input}
    answer_template: str  # uses {answer}

    @classmethod
    def from_config(cls, model_cfg: DictConfig, dataset_cfg: DictConfig) -> "PromptFormat":
        return cls(dataset_cfg.instruction, model_cfg.prompt_template, model_cfg.answer_template)

    def prompt(self, text: str) -> str:
        return self.prompt_template.format(instruction=self.instruction, input=text)

    def answer(self, label: str) -> str:
        return self.answer_template.format(answer=label)


def encode_example(tokenizer, prompt: str, answer: str, loss_on: str) -> dict[str, list[int]]:
    """Prompt and answer are tokenised separately, exactly as label scoring does, so train and eval agree.

    loss_on="answer": labels only on the answer tokens (instruct); "all": on every token (causal).
    """
    prompt_ids = tokenizer(prompt).input_ids  # with the model's BOS
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
    input_ids = prompt_ids + answer_ids
    if loss_on == "answer":
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    elif loss_on == "all":
        labels = list(input_ids)
    else:
        raise ValueError(f"method.loss_on must be 'answer' or 'all', got {loss_on!r}")
    return {"input_ids": input_ids, "labels": labels}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and loss."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
