"""A Method owns the model of a run: building it, scoring it before and after training, the training data encoding
and loss, and what is saved. The Task (llmtune.tasks) says what the rows are and how answers are judged."""

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, Timer
from omegaconf import DictConfig, OmegaConf

from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.scoring import label_log_likelihoods
from llmtune.files import atomic_folder
from llmtune.models.merging import adapter_merged
from llmtune.tasks import Task
from llmtune.training.module import FineTuner


class Method(ABC):
    trains = False  # False: a prompting baseline, scored as it is
    prompted = True  # the model reads a prompt (False: a classification head reads the raw text)
    generates = True  # a finished run's model continues text (serve's chat and completion routes)
    export_formats = ("merged", "gguf", "ollama")  # what `llmtune export` writes for a run of this method

    def __init__(self, name: str, **settings):
        self.name = name
        # The method's own config, for the helpers that read it (add_lora, load_classifier, ...).
        self.settings = OmegaConf.create({"name": name, **settings})
        self.tokenizer, self.model = None, None

    @abstractmethod
    def build(self, model_cfg: DictConfig, task: Task, model_dir: str) -> None:
        """Load the tokenizer and the model this method trains or prompts."""

    def prompt_format(self, zero_shot: PromptFormat, task: Task, splits: dict, seed: int) -> PromptFormat:
        """The prompt the method's model is scored (and trained) with."""
        return zero_shot

    def base_predictions(self, task: Task, rows: list[dict], zero_shot: PromptFormat, eval_cfg: DictConfig
                         ) -> list[dict] | None:
        """The untuned base model's answers to rows, zero-shot; None where no untuned answer exists."""
        return task.lm_predictions(self.model, self.tokenizer, rows, zero_shot, eval_cfg, "scoring base model")

    def predictions(self, task: Task, rows: list[dict], prompt_format: PromptFormat, eval_cfg: DictConfig,
                    desc: str) -> list[dict]:
        return task.lm_predictions(self.model, self.tokenizer, rows, prompt_format, eval_cfg, desc)

    def fit(self, task: Task, splits: dict, prompt_format: PromptFormat, trainer_cfg: DictConfig, seed: int,
            new_trainer: Callable[[], L.Trainer], resume_from: Path | None = None,
            selection: "ModelSelection | None" = None) -> dict:  # noqa: F821
        """Train (continuing from the checkpoint resume_from, when given), then put back the weights selection picks;
        what was trained, for metrics.json."""
        return {"epochs": 0, "steps": 0, "tokens": 0, "tokens_per_s": 0.0, "resumed_from_step": None}

    def inference_weights(self) -> AbstractContextManager:
        """A block for the scoring after training: a LoRA adapter folded into the frozen weights, as fast as the bare
        base (llmtune.models.merging); other models as they are."""
        return adapter_merged(self.model)

    def save(self, run_dir: Path) -> None:
        """Write what a later predict/serve/export loads (nothing for a prompting baseline)."""

    def describe(self, model_cfg: DictConfig) -> dict:
        """The method's part of metrics.json's `run`."""
        return {"trained": self.trains, "lora": None}

    # A finished run, loaded again to predict, serve or export (llmtune.inference.LoadedRun delegates here).

    def run_dtype(self, model_cfg: DictConfig) -> str:
        """The dtype the run's model was scored in: what predict loads it in unless told otherwise."""
        return model_cfg.dtype

    def load_finished(self, run_dir: Path, cfg: DictConfig, labels: list[str] | None, model_path: Path | None,
                      torch_dtype, dequantize: bool = False, trusted: bool = False) -> tuple:
        """(tokenizer, model) to predict with: model_path (an export), else what save() wrote, on the base model."""
        from llmtune.inference import load_language_model

        return load_language_model(run_dir, cfg, self.trains, model_path, torch_dtype, dequantize, trusted)

    def model_inputs(self, rows: list[dict], prompt_format: PromptFormat) -> list[str]:
        """What the model reads for rows {text, context?}: each row's prompt."""
        return [prompt_format.prompt(r["text"], r.get("context", "")) for r in rows]

    def label_logits(self, model, tokenizer, inputs: list[str], labels: list[str], prompt_format: PromptFormat,
                     batch_size: int, desc: str) -> torch.Tensor:
        """[len(inputs), len(labels)]: the labels' log-likelihoods after each prompt (softmax: the confidences)."""
        answers = [prompt_format.answer(label) for label in labels]
        return label_log_likelihoods(model, tokenizer, inputs, answers, batch_size, desc)


class TrainedMethod(Method):
    """Trains LoRA adapters (or, with full_finetune, every weight) with one LightningModule and this method's loss."""

    trains = True

    def __init__(self, name: str, lora: DictConfig, optimizer: DictConfig, scheduler: DictConfig,
                 full_finetune: bool = False, label_smoothing: float = 0.0, neftune_noise_alpha: float = 0.0,
                 **settings):
        super().__init__(name, lora=lora, optimizer=optimizer, scheduler=scheduler, full_finetune=full_finetune,
                         label_smoothing=label_smoothing, neftune_noise_alpha=neftune_noise_alpha, **settings)
        self.full_finetune = full_finetune

    @abstractmethod
    def loaders(self, task: Task, splits: dict, prompt_format: PromptFormat, trainer_cfg: DictConfig, seed: int):
        """(train loader, validation loader or None) of encoded rows."""

    @staticmethod
    @abstractmethod
    def loss(model, batch) -> "torch.Tensor":  # noqa: F821
        """The training loss of a batch."""

    def fit(self, task, splits, prompt_format, trainer_cfg, seed, new_trainer, resume_from=None,
            selection=None) -> dict:
        train_loader, val_loader = self.loaders(task, splits, prompt_format, trainer_cfg, seed)
        module = FineTuner(self.model, optimizer=instantiate(self.settings.optimizer),
                           scheduler=instantiate(self.settings.scheduler),
                           loss=partial(self.loss, label_smoothing=self.settings.label_smoothing))
        trainer, started, threads = new_trainer(), time.perf_counter(), torch.get_num_threads()
        # Lightning restores the adapter, optimizer, scheduler, epoch and step; the samplers draw each epoch's order
        # from (seed, epoch), so the continued run sees the batches the uninterrupted one would have.
        with noisy_embeddings(self.model, self.settings.neftune_noise_alpha):
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from)
        # Under trainer=ddp on a CPU Lightning gave each rank its share of the cores; the scoring after training is
        # rank 0's alone, on all of them.
        torch.set_num_threads(threads)
        trained_now = module.tokens_seen - module.tokens_restored  # by this run, not the run it resumed
        return {"epochs": trainer.current_epoch, "steps": trainer.global_step, "tokens": module.tokens_seen,
                "processes": trainer.world_size, "strategy": type(trainer.strategy).__name__,
                "tokens_per_s": trained_now / (time.perf_counter() - started),
                "resumed_from_step": module.resumed_from_step,
                "stopped_by": _stop_reason(trainer),
                "selection": selection.restore(self.model) if selection else None}

    def save(self, run_dir: Path) -> None:
        """adapter/ (PeftModel.from_pretrained loads it), or with full_finetune the whole model/ with its tokenizer."""
        with atomic_folder(run_dir / ("model" if self.full_finetune else "adapter"), overwrite=True,
                           what=f"method={self.name}") as folder:
            self.model.save_pretrained(folder)
            if self.full_finetune:
                self.tokenizer.save_pretrained(folder)

    def describe(self, model_cfg: DictConfig) -> dict:
        from llmtune.models.lora import lora_settings

        return {"trained": True, "lora": None if self.full_finetune else lora_settings(model_cfg, self.settings)}


@contextmanager
def noisy_embeddings(model, alpha: float):
    """NEFTune while training: transformers' hook adds uniform noise of scale alpha / sqrt(tokens x width) to the
    input embeddings of a module in training mode (validation passes are left clean); removed afterwards, so the
    scoring, and what is saved, never see it. alpha 0: nothing."""
    if not alpha:
        yield
        return
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    hook = activate_neftune(model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(model, hook)


def _stop_reason(trainer: L.Trainer) -> str:
    """Why training ended: the step or epoch limit, early stopping, or the wall budget (trainer.max_time)."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer) and callback.time_remaining() is not None and callback.time_remaining() <= 0:
            return "max_time"
        if isinstance(callback, EarlyStopping) and callback.wait_count >= callback.patience:
            return "early_stopping"
    return "limit"


def print_trainable(model) -> None:
    """PEFT's trainable-parameter line, for any model (LoRA, a new head, or every weight)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


def method_of(cfg: DictConfig, trust_remote_code: bool = False) -> Method:
    """The method of a run's saved config. Runs written before `method` named its class (`_target_`) said
    head: classifier|lm and train: true|false."""
    from llmtune.trust import instantiate_trusted

    node = cfg.method
    if "_target_" not in node:
        legacy = ("llmtune.methods.ClassificationHead" if node.get("head") == "classifier" else
                  "llmtune.methods.LanguageModelTuning" if node.get("train", True) else "llmtune.methods.Prompting")
        keep = {"ClassificationHead": ("name", "lora", "max_length", "full_finetune"),
                "LanguageModelTuning": ("name", "lora", "loss_on", "quantization", "gradient_checkpointing"),
                "Prompting": ("name", "demonstrations", "quantization")}[legacy.rsplit(".", 1)[1]]
        node = OmegaConf.create({"_target_": legacy, **{k: node.get(k) for k in keep if k in node}})
        if legacy != "llmtune.methods.Prompting":
            node.optimizer, node.scheduler = {}, {}
    return instantiate_trusted(node, trust_remote_code, _recursive_=False)
