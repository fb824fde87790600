"""Loaders and Trainer exactly as a run builds them (the speed benchmark reuses these, not a copy)."""

from functools import partial
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from llmtune.data.batching import LengthPoolBatchSampler
from llmtune.data.prompts import PromptFormat, encode_example, pad_batch

LOADER_KEYS = ("batch_size", "length_pool_batches")  # trainer/ keys for the loaders; the rest go to L.Trainer


def encode_rows(rows: list[dict], tokenizer, prompt_format: PromptFormat, loss_on: str) -> list[dict]:
    return [encode_example(tokenizer, prompt_format.prompt(r["text"]), prompt_format.answer(r["label"]), loss_on)
            for r in rows]


def make_loaders(train: list[dict], val: list[dict], trainer_cfg: DictConfig, pad_id: int, seed: int):
    collate = partial(pad_batch, pad_id=pad_id)
    batches = LengthPoolBatchSampler([len(e["input_ids"]) for e in train], trainer_cfg.batch_size,
                                     trainer_cfg.length_pool_batches, seed)
    train_loader = DataLoader(train, batch_sampler=batches, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=trainer_cfg.batch_size, collate_fn=collate) if val else None
    return train_loader, val_loader


def make_trainer(trainer_cfg: DictConfig, run_dir: Path, logger, callbacks: list, **overrides) -> L.Trainer:
    settings = {k: v for k, v in OmegaConf.to_container(trainer_cfg, resolve=True).items() if k not in LOADER_KEYS}
    return L.Trainer(**{**settings, **overrides}, default_root_dir=run_dir, logger=logger, callbacks=callbacks)
