"""Turn rows into token sequences: the model file gives the prompt format, the method decides where the loss goes."""

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig

from llmtune.errors import UserError

PROMPT_FILE = "prompt.json"  # a run's final prompt format, beside its weights: predict, serve and export reuse it
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy (and our masks) skip
DEMONSTRATION_TEMPLATE = "Text: {input}\nAnswer: {answer}"
# Stand-ins for the instruction and the input while a chat template renders: Jinja passes them through untouched, and
# no real text contains a NUL character.
_INSTRUCTION, _INPUT = "\x00instruction\x00", "\x00input\x00"


@dataclass(frozen=True)
class PromptFormat:
    instruction: str
    prompt_template: str  # uses {instruction} and {input}
    answer_template: str  # uses {answer}

    @classmethod
    def from_config(cls, model_cfg: DictConfig, dataset_cfg: DictConfig, tokenizer=None) -> "PromptFormat":
        """The model family's templates (conf/prompt/); with model.use_chat_template and a tokenizer that has a chat
        template, that template renders the prompt instead. The answer template always comes from the config: it
        closes the assistant's turn, which a chat template rendering the generation prompt does not write."""
        prompt_template = model_cfg.prompt_template
        if model_cfg.get("use_chat_template", False) and getattr(tokenizer, "chat_template", None):
            prompt_template = chat_prompt_template(tokenizer)
        return cls(dataset_cfg.instruction, prompt_template, model_cfg.answer_template)

    def prompt(self, text: str, context: str = "") -> str:
        """The row's prompt; retrieved context (document chunks or labelled examples, rag=true) follows the
        instruction, a blank line apart, so it sits where few-shot demonstrations sit."""
        instruction = f"{self.instruction}\n\n{context}" if context else self.instruction
        return self.prompt_template.format(instruction=instruction, input=text)

    def answer(self, label: str) -> str:
        return self.answer_template.format(answer=label)

    def save(self, folder: Path) -> None:
        """folder/prompt.json: the instruction (with any few-shot demonstrations) and templates, as used."""
        from llmtune.files import write_atomic

        write_atomic(folder / PROMPT_FILE, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "PromptFormat | None":
        """The prompt format saved in folder, or None where none was saved."""
        saved = folder / PROMPT_FILE
        return cls(**json.loads(saved.read_text(encoding="utf-8"))) if saved.is_file() else None


def chat_prompt_template(tokenizer) -> str:
    """The tokenizer's chat template as a prompt template: one user turn (instruction, blank line, input), then the
    opening of the assistant's turn.

    It is rendered once with stand-ins, so every row gets the same template and str.format fills it in. A leading BOS
    text is dropped when the tokenizer adds BOS itself on encoding (Gemma, Llama, Mistral), since the prompt would
    otherwise start with two; a tokenizer that adds none (Phi-3) keeps the BOS the template writes, if any.
    """
    messages = [{"role": "user", "content": f"{_INSTRUCTION}\n\n{_INPUT}"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and rendered.startswith(bos) and _adds_bos(tokenizer):
        rendered = rendered[len(bos):]
    escaped = rendered.replace("{", "{{").replace("}", "}}")  # literal braces survive str.format
    return escaped.replace(_INSTRUCTION, "{instruction}").replace(_INPUT, "{input}")


def _adds_bos(tokenizer) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]


def with_demonstrations(prompt_format: PromptFormat, rows: list[dict], labels: list[str], shots_per_label: int,
                        seed: int, template: str = DEMONSTRATION_TEMPLATE) -> PromptFormat:
    """Few-shot: shots_per_label rows of each label, drawn with the seed and shuffled so the labels are not grouped,
    written with template ({input}, {answer}) after the instruction, a blank line apart.

    The demonstrations belong to the instruction, so every prompt starts with the same long prefix, which scoring
    computes once and reuses (shared-prefix KV cache).
    """
    rng = random.Random(seed)
    chosen = []
    for label in labels:
        candidates = [row for row in rows if row["label"] == label]
        if len(candidates) < shots_per_label:
            raise UserError(f"few-shot needs {shots_per_label} training rows labelled '{label}' but the train split "
                            f"has {len(candidates)}: lower method.demonstrations.shots_per_label or raise "
                            "dataset.split.train_per_class")
        chosen += rng.sample(candidates, shots_per_label)
    if not chosen:  # zero shots: the zero-shot prompt as it was
        return prompt_format
    rng.shuffle(chosen)
    demonstrations = [template.format(input=row["text"], answer=row["label"]) for row in chosen]
    return replace(prompt_format, instruction="\n\n".join([prompt_format.instruction, *demonstrations]))


def encode_example(tokenizer, prompt: str, answer: str, loss_on: str, end_with_eos: bool = False
                   ) -> dict[str, list[int]]:
    """Prompt and answer are tokenised separately, exactly as label scoring does, so train and eval agree.

    loss_on="answer": labels only on the answer tokens (instruct); "all": on every token (causal).
    end_with_eos: the answer ends with the EOS token, so a model that generates its answer learns to stop (Q&A);
    label scoring needs none.
    """
    prompt_ids = tokenizer(prompt).input_ids  # with the model's BOS
    answer_ids = tokenizer(answer, add_special_tokens=False).input_ids + ([tokenizer.eos_token_id] if end_with_eos
                                                                           else [])
    input_ids = prompt_ids + answer_ids
    if loss_on == "answer":
        labels = [IGNORE_INDEX] * len(prompt_ids) + answer_ids
    elif loss_on == "all":
        labels = list(input_ids)
    else:
        raise ValueError(f"method.loss_on must be 'answer' or 'all', got {loss_on!r}")
    return {"input_ids": input_ids, "labels": labels}


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """Tokens every sequence starts with, leaving at least one token of each sequence after the prefix."""
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    length = 0
    while length < limit and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


def split_shared_prefix(examples: list[dict[str, list[int]]]) -> tuple[list[int], list[dict[str, list[int]]]]:
    """The instruction every example starts with, and each example's remainder.

    The prefix stops before the position that predicts the first label, so the prefix itself carries no loss and is
    the same computation for every row: a batch computes it once (~45 of ~80 tokens for the sentiment prompt).
    With the loss on every token (causal) the prefix would carry labels, so nothing is split off.
    """
    first_label = [next((t for t, label in enumerate(e["labels"]) if label != IGNORE_INDEX), 0) for e in examples]
    length = min(shared_prefix_length([e["input_ids"] for e in examples]), min(first_label) - 1)
    if length <= 0:
        return [], examples
    return examples[0]["input_ids"][:length], [{k: v[length:] for k, v in e.items()} for e in examples]


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int, prefix_ids: list[int] | None = None
              ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; padding is masked out of attention and loss. A shared prefix travels along
    as `prefix_ids` (see split_shared_prefix)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"])
        labels[row, :n] = torch.tensor(example["labels"])
        attention_mask[row, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if prefix_ids:
        batch["prefix_ids"] = torch.tensor(prefix_ids)
    return batch


def pack_batch(packs: list[list[dict[str, list[int]]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Each pack's examples end to end in one row, the rows right-padded to the longest.

    Position ids restart at 0 with every example: transformers reads that as packed sequences and masks attention
    block-diagonally (no example sees another), when the model is called without an attention mask and without a
    cache. Each example's first token carries no label, as in an unpacked row, where nothing precedes it: here it
    would otherwise be predicted from the previous example's last token. The padding continues as one more
    sequence of its own, which nothing attends to and no loss reads.
    """
    rows = [{"input_ids": [t for e in pack for t in e["input_ids"]],
             "labels": [t for e in pack for t in [IGNORE_INDEX] + e["labels"][1:]]} for pack in packs]
    batch = pad_batch(rows, pad_id)
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = torch.tensor([
        [p for e in pack for p in range(len(e["input_ids"]))] + list(range(width - len(row["input_ids"])))
        for pack, row in zip(packs, rows)])
    return batch


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens the batch stands for, its shared prefix counted once per row."""
    prefix = len(batch["prefix_ids"]) if "prefix_ids" in batch else 0
    return int(batch["attention_mask"].sum()) + prefix * len(batch["input_ids"])
