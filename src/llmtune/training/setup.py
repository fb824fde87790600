"""Loaders and Trainer exactly as a run builds them (the speed benchmark reuses these, not a copy)."""

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from llmtune.console import progress_every_s
from llmtune.data.batching import LengthPoolBatchSampler, PackedBatchSampler, Packs, ResumableLoader
from llmtune.data.prompts import PromptFormat, encode_example, pack_batch, pad_batch, split_shared_prefix
from llmtune.training.checkpoints import AtomicCheckpointIO
from llmtune.training.progress import PlainProgress
from llmtune.training.selection import SELECTION_KEYS

# trainer/ keys that shape the loaders, and those of model selection; every other trainer/ key goes to L.Trainer as it
# is.
# Batches in page-locked memory copy to a CUDA GPU asynchronously; on a CPU there is nothing to copy to.
PIN = torch.cuda.is_available()
LOADER_KEYS = ("batch_size", "length_pool_batches", "share_prefix", "packing")
OWN_KEYS = LOADER_KEYS + SELECTION_KEYS


def encode_rows(rows: list[dict], tokenizer, prompt_format: PromptFormat, loss_on: str,
                target: Callable[[dict], str] = lambda row: row["label"], end_with_eos: bool = False) -> list[dict]:
    """Each row's prompt and its answer (target(row): a label, a reference answer), ended by EOS where the model must
    learn to stop generating."""
    return [encode_example(tokenizer, prompt_format.prompt(r["text"], r.get("context", "")),
                           prompt_format.answer(target(r)), loss_on, end_with_eos=end_with_eos)
            for r in rows]


def make_loaders(train: list[dict], val: list[dict], trainer_cfg: DictConfig, pad_id: int, seed: int):
    """Length-pooled (or, with trainer.packing, packed), seeded training batches, whose place in the epoch goes into
    each checkpoint; the instruction shared by all rows is split off and computed once per batch when
    trainer.share_prefix is on (loss and gradients are the same, up to float rounding). Validation batches are never
    packed: val/loss stays comparable across settings."""
    def loader(examples, kind=DataLoader, **options):
        prefix, rest = split_shared_prefix(examples) if trainer_cfg.share_prefix else ([], examples)
        return kind(rest, collate_fn=partial(pad_batch, pad_id=pad_id, prefix_ids=prefix), pin_memory=PIN, **options)

    lengths = [len(e["input_ids"]) for e in train]
    if trainer_cfg.packing:  # rows end to end in sequences of up to `packing` tokens; batch_size counts those
        batches = PackedBatchSampler(lengths, trainer_cfg.batch_size, trainer_cfg.packing, seed)
        train_loader = ResumableLoader(Packs(train), batch_sampler=batches, pin_memory=PIN,
                                       collate_fn=partial(pack_batch, pad_id=pad_id))
    else:
        batches = LengthPoolBatchSampler(lengths, trainer_cfg.batch_size, trainer_cfg.length_pool_batches, seed)
        train_loader = loader(train, ResumableLoader, batch_sampler=batches)
    return train_loader, loader(val, batch_size=trainer_cfg.batch_size) if val else None


def trainer_settings(trainer_cfg: DictConfig) -> dict:
    """L.Trainer's keyword arguments from trainer/: llmtune's own keys left out, a strategy given as a `_target_` node
    (conf/trainer/ddp.yaml) instantiated."""
    from hydra.utils import instantiate

    settings = {k: v for k, v in OmegaConf.to_container(trainer_cfg, resolve=True).items() if k not in OWN_KEYS}
    if isinstance(settings.get("strategy"), dict):
        settings["strategy"] = instantiate(settings["strategy"])
    return settings


def make_trainer(trainer_cfg: DictConfig, run_dir: Path, logger, callbacks: list, **overrides) -> L.Trainer:
    settings = {**trainer_settings(trainer_cfg), **overrides}
    if settings.get("enable_progress_bar", True) and not sys.stdout.isatty():
        # Lightning's bar redraws one line, which a log file gets only when the epoch ends: plain lines instead.
        settings["enable_progress_bar"] = False
        callbacks = [*callbacks, PlainProgress(progress_every_s())]
    return L.Trainer(**settings, default_root_dir=run_dir, logger=logger, callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()])


def instantiate_each(nodes: DictConfig) -> list:
    """Every `_target_` node of a mapping (e.g. callbacks: {checkpoint: {...}}); a null entry is left out, so one can be
    switched off from the command line (callbacks.checkpoint=null)."""
    from hydra.utils import instantiate

    return [instantiate(node) for node in nodes.values() if node is not None]
