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


def next_token_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the labelled tokens (answer tokens for instruct, every token for causal)."""
    cache = prefix_cache(model, batch["prefix_ids"]) if "prefix_ids" in batch else None
    return labelled_loss(model, batch, cache)


# bitsandbytes' paged optimizers: optimizer state in CUDA unified memory, paged to the CPU under memory pressure.
PAGED_OPTIMIZERS = {"paged_adamw_8bit": "PagedAdamW8bit", "paged_adamw_32bit": "PagedAdamW32bit"}


def make_optimizer(name: str, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name in PAGED_OPTIMIZERS and torch.cuda.is_available():
        import bitsandbytes as bnb

        return getattr(bnb.optim, PAGED_OPTIMIZERS[name])(parameters, lr=lr, weight_decay=weight_decay)
    if name in PAGED_OPTIMIZERS:  # config.check_config has already rejected unknown names
        log.warning("optimizer %s needs CUDA (paged memory); training with torch AdamW on this CPU instead", name)
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


class FineTuner(L.LightningModule):
    """Trains the model's trainable weights (LoRA adapters, a new head, or every weight) with `loss(model, batch)`."""

    def __init__(self, model, lr: float, weight_decay: float, warmup_ratio: float, name: str = "adamw",
                 loss: Callable = next_token_loss):
        super().__init__()
        self.model, self.loss = model, loss
        self.lr, self.weight_decay, self.warmup_ratio, self.optimizer_name = lr, weight_decay, warmup_ratio, name
        # Checkpoints hold adapter weights only, so loading one must not demand the frozen base weights.
        self.strict_loading = False
        self.tokens_seen = 0  # non-padding tokens trained on, for tokens/s

    def on_fit_start(self):
        self.model.train()  # scoring the base model left it in eval mode; dropout, if configured, must be active

    def training_step(self, batch, batch_idx):
        loss = self.loss(self.model, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        self.tokens_seen += batch_tokens(batch)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self.loss(self.model, batch)
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))

    def configure_optimizers(self):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = make_optimizer(self.optimizer_name, trainable, lr=self.lr, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        scheduler = get_cosine_schedule_with_warmup(optimizer, round(self.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
