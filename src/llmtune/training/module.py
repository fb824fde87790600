"""One LightningModule for every method: the methods differ in data (where labels sit) and in the loss function
(next-token loss on the labelled tokens, or a classification head's cross-entropy), not in classes."""

import logging
from collections.abc import Callable

import lightning as L
import torch
from transformers import get_cosine_schedule_with_warmup

from llmtune.data.prompts import batch_tokens
from llmtune.models.logits import labelled_loss, prefix_cache

log = logging.getLogger(__name__)


def next_token_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (answer tokens for instruct, every token for causal)."""
    cache = prefix_cache(model, batch["prefix_ids"]) if "prefix_ids" in batch else None
    return labelled_loss(model, batch, cache, label_smoothing)


def paged_adamw(parameters, lr: float, weight_decay: float = 0.0, bits: int = 8) -> torch.optim.Optimizer:
    """bitsandbytes' paged AdamW (optimizer state in CUDA unified memory, paged to the CPU under memory pressure); on a
    machine without CUDA, torch's AdamW with a notice."""
    if torch.cuda.is_available():
        import bitsandbytes as bnb

        paged = {8: bnb.optim.PagedAdamW8bit, 32: bnb.optim.PagedAdamW32bit}[bits]
        return paged(parameters, lr=lr, weight_decay=weight_decay)
    log.warning("paged AdamW (%d-bit) needs CUDA; training with torch AdamW on this CPU instead", bits)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.1):
    """Linear warm-up over warmup_ratio of the steps, then cosine decay to zero."""
    return get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)


class FineTuner(L.LightningModule):
    """Trains the model's trainable weights (LoRA adapters, a new head, or every weight) with `loss(model, batch)`.

    optimizer(parameters) and scheduler(optimizer, total_steps) come from the method's config (`_partial_`)."""

    def __init__(self, model, optimizer: Callable, scheduler: Callable, loss: Callable = next_token_loss):
        super().__init__()
        self.model, self.loss = model, loss
        self.make_optimizer, self.make_scheduler = optimizer, scheduler
        # Checkpoints hold adapter weights only, so loading one must not demand the frozen base weights.
        self.strict_loading = False
        self.tokens_seen = 0  # non-padding tokens trained on, for tokens/s
        self.resumed_from_step = None  # the checkpoint's step, when fit continued a killed run
        self.tokens_restored = 0  # tokens_seen of the checkpoint fit continued from
        self.loader_states = []  # the training loader's place in its epoch, as the checkpoint fit continues from has it

    def on_fit_start(self):
        self.model.train()  # scoring the base model left it in eval mode; dropout, if configured, must be active

    def on_train_start(self):
        """A resumed run's training loader gets back its place in the epoch (data.batching.ResumableLoader) before it
        draws a batch, so a run resumed from a checkpoint taken mid-epoch trains on the rest of that epoch's batches.
        Lightning would do it only for a loader it builds after restoring its loops; configure_optimizers asks for
        estimated_stepping_batches, which builds the loader before."""
        loader = self.trainer.train_dataloader
        if self.loader_states and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(self.loader_states[0])
        self.loader_states = []

    def training_step(self, batch, batch_idx):
        loss = self.loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        # Counted over every rank (a sum over the process group; one process: its own count), so tokens/s and a
        # resumed run's count are the run's, not one rank's.
        self.tokens_seen += int(self.trainer.strategy.reduce(
            torch.tensor(batch_tokens(batch), device=self.device), reduce_op="sum"))
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(self.model, batch)
        # Every rank scores all validation rows (trainer.use_distributed_sampler=false): the mean over ranks is the
        # one-process value, and sync_dist keeps Lightning's callbacks on every rank agreeing on it.
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]), sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        scheduler = self.make_scheduler(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["tokens_seen"] = self.tokens_seen

    def on_load_checkpoint(self, checkpoint):
        self.tokens_seen = self.tokens_restored = checkpoint.get("tokens_seen", 0)
        self.resumed_from_step = checkpoint["global_step"]
        self.loader_states = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get(
            "combined_loader") or []
