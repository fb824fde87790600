"""method=classifier: a new sequence-classification head on an encoder or a causal LM, trained with LoRA or fully.

The head reads the raw text (no prompt) and gives one logit per label. Predictions have the format of label scoring
(evaluation.scoring.classify), so metrics, predictions files and reports are shared with the LM methods.
"""

import json
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmtune.data.batching import LengthPoolBatchSampler, ResumableLoader
from llmtune.errors import UserError
from llmtune.evaluation.batches import length_sorted_batches
from llmtune.evaluation.scoring import labelled_predictions
from llmtune.methods.base import TrainedMethod, print_trainable
from llmtune.models.loader import prepare_model_dir
from llmtune.models.lora import lora_settings
from llmtune.models.merging import merged_for_inference


def load_classifier(model_cfg: DictConfig, method_cfg: DictConfig, labels: list[str], model_dir: str):
    """Tokenizer and model with a new len(labels)-way head: LoRA on the body and the head trained fully (PEFT's
    SEQ_CLS task keeps the head in modules_to_save), or with method.full_finetune every weight trained."""
    tokenizer, model = load_sequence_classifier(model_dir, labels, getattr(torch, head_dtype(model_cfg, method_cfg)),
                                                bool(model_cfg.trust_remote_code), f"model '{model_cfg.name}'")
    if not method_cfg.full_finetune:
        model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **lora_settings(model_cfg, method_cfg)))
    print_trainable(model)
    return tokenizer, model


def head_dtype(model_cfg: DictConfig, method_cfg: DictConfig) -> str:
    """The dtype the head model trains and is scored in."""
    # Full fine-tuning steps every weight with AdamW; in bf16 most of those small steps would round away.
    return "float32" if method_cfg.full_finetune else model_cfg.dtype


def load_sequence_classifier(model_dir: str | Path, labels: list[str], dtype: torch.dtype,
                             trust_remote_code: bool = False, what: str = "the model"):
    """Tokenizer and AutoModelForSequenceClassification from model_dir with a len(labels)-way head named by the
    labels: a new head on a bare body, or a saved classifier's own head (its labels must be these)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)}, dtype=dtype, use_safetensors=True,
            trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as error:  # missing files, .bin only, no classification class, size
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load {what} as a classifier from {model_dir}: {first_line[:300]}") from None
    if tokenizer.pad_token is None:  # causal LMs often have none
        tokenizer.pad_token = tokenizer.eos_token
    # A causal LM's head reads each row's last non-padding token, found by this id (encoders read [CLS]).
    model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def load_saved_classifier(folder: Path, labels: list[str], dtype: torch.dtype):
    """A classifier saved whole (a full fine-tuning run's model/, or a merged export): head included, and its labels
    must be the run's."""
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a saved classifier (no config.json): pass the folder `llmtune export RUN "
                        "format=merged` wrote, or a run that finished")
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("id2label") or {}
    saved_labels = [saved[key] for key in sorted(saved, key=int)]
    if saved_labels != labels:
        raise UserError(f"{folder} classifies into {saved_labels}, the run into {labels}: pass this run's own export")
    return load_sequence_classifier(folder, labels, dtype, what=str(folder))


def _token_ids(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length).input_ids


def encode_texts(rows: list[dict], tokenizer, labels: list[str], max_length: int) -> list[dict]:
    """Each row as its text's token ids and its label's index (the head's output position)."""
    ids = _token_ids(tokenizer, [r["text"] for r in rows], max_length)
    return [{"input_ids": row_ids, "label": labels.index(r["label"])} for row_ids, r in zip(ids, rows)]


def pad_examples(examples: list[dict], tokenizer) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask padded on the tokenizer's side, and the label indices."""
    batch = tokenizer.pad({"input_ids": [e["input_ids"] for e in examples]}, return_tensors="pt")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([e["label"] for e in examples])}


def classifier_loaders(train: list[dict], val: list[dict], trainer_cfg: DictConfig, tokenizer, seed: int):
    """Length-pooled, seeded training batches as for the LM methods; trainer.share_prefix does not apply (no prompt)."""
    collate = partial(pad_examples, tokenizer=tokenizer)
    batches = LengthPoolBatchSampler([len(e["input_ids"]) for e in train], trainer_cfg.batch_size,
                                     trainer_cfg.length_pool_batches, seed)
    return (ResumableLoader(train, batch_sampler=batches, collate_fn=collate),  # resumes mid-epoch where it stopped
            DataLoader(val, batch_size=trainer_cfg.batch_size, collate_fn=collate) if val else None)


def head_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the head's logits against the label indices, in fp32 whatever the model's dtype."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing)


def classify_with_head(model, tokenizer, rows: list[dict], labels: list[str], batch_size: int, max_length: int,
                       desc: str = "scoring") -> list[dict]:
    """Predictions for rows, as classify gives them: {id, text, gold, predicted, scores, logits}."""
    logits = head_logits(model, tokenizer, [r["text"] for r in rows], batch_size, max_length, desc)
    return labelled_predictions(rows, labels, logits)


@torch.no_grad()
def head_logits(model, tokenizer, texts: list[str], batch_size: int, max_length: int, desc: str = "scoring"
                ) -> torch.Tensor:
    """[len(texts), number of labels]: the head's logits for each text (in fp32), cut at max_length tokens."""
    model.eval()
    ids = _token_ids(tokenizer, texts, max_length)
    logits = torch.full((len(texts), model.config.num_labels), float("nan"))
    for batch in length_sorted_batches([len(row_ids) for row_ids in ids], batch_size, desc):
        inputs = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, return_tensors="pt").to(model.device)
        logits[batch] = model(**inputs).logits.float().cpu()
    return logits


class ClassificationHead(TrainedMethod):
    """A new len(labels)-way head; it has no untuned answer, so a run's base column stays empty."""

    prompted = False
    generates = False  # a head gives one logit per label: no text to continue
    export_formats = ("merged",)  # GGUF and Ollama carry language models

    def __init__(self, name: str, max_length: int, lora: DictConfig, optimizer: DictConfig, scheduler: DictConfig,
                 full_finetune: bool = False, label_smoothing: float = 0.0, neftune_noise_alpha: float = 0.0):
        super().__init__(name, lora, optimizer, scheduler, full_finetune, label_smoothing, neftune_noise_alpha,
                         max_length=max_length)
        self.max_length = max_length

    def build(self, model_cfg, task, model_dir) -> None:
        self.tokenizer, self.model = load_classifier(model_cfg, self.settings, task.labels, model_dir)

    def base_predictions(self, task, rows, zero_shot, eval_cfg) -> None:
        return None

    def predictions(self, task, rows, prompt_format, eval_cfg, desc) -> list[dict]:
        return classify_with_head(self.model, self.tokenizer, rows, task.labels, eval_cfg.batch_size,
                                  self.max_length, desc)

    def loaders(self, task, splits, prompt_format, trainer_cfg, seed):
        """Raw text -> label index (rag is not read: there is no prompt to put context in)."""
        def encode(rows):
            return encode_texts(rows, self.tokenizer, task.labels, self.max_length)
        return classifier_loaders(encode(splits["train"]), encode(splits["val"]), trainer_cfg, self.tokenizer, seed)

    loss = staticmethod(head_loss)

    def run_dtype(self, model_cfg) -> str:
        return head_dtype(model_cfg, self.settings)

    def load_finished(self, run_dir, cfg, labels, model_path, torch_dtype, dequantize=False, trusted=False):
        """model_path (a merged export), the fully fine-tuned model/, or the base with a head for the labels and the
        adapter (LoRA and the trained head) on it."""
        if model_path is not None:
            return load_saved_classifier(Path(model_path), labels, torch_dtype)
        saved = run_dir / ("model" if self.full_finetune else "adapter")
        if not saved.is_dir():
            raise UserError(f"{run_dir} has no {saved.name}/ (the run did not finish?): check "
                            f"{run_dir / 'status.json'} and pick a completed run")
        if self.full_finetune:
            return load_saved_classifier(saved, labels, torch_dtype)
        with _quiet_load_report():  # it would call the head "newly initialized": the adapter brings the trained one
            tokenizer, model = load_sequence_classifier(prepare_model_dir(cfg.model, cfg.paths.cache_dir, trusted),
                                                        labels, torch_dtype, bool(cfg.model.trust_remote_code),
                                                        f"model '{cfg.model.name}'")
        return tokenizer, merged_for_inference(PeftModel.from_pretrained(model, saved))  # as fast as the base

    def model_inputs(self, rows, prompt_format) -> list[str]:
        return [r["text"] for r in rows]  # the raw text, as trained: no prompt, no context

    def label_logits(self, model, tokenizer, inputs, labels, prompt_format, batch_size, desc):
        return head_logits(model, tokenizer, inputs, batch_size, self.max_length, desc)


@contextmanager
def _quiet_load_report():
    """transformers' warnings (its load report among them) off while the block runs."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
