"""Training progress as plain lines, for a stdout that is not a terminal (a log file, a batch job), where Lightning's
progress bar writes nothing until the epoch ends. Kept apart from llmtune.console, which must stay cheap to import."""

import math
import time

import lightning as L

from llmtune.console import Every, clock


class PlainProgress(L.Callback):
    """A line at most every `every_s` seconds of training and one at each epoch's end: epoch, optimizer step / total
    steps, mean training loss since the previous line (at an epoch's end also the validation loss and metrics),
    training tokens/s (validation time left out), ETA."""

    def __init__(self, every_s: float = 30):
        self.every_s = every_s

    def on_train_start(self, trainer, pl_module):
        self.due, self.losses = Every(self.every_s), []
        self.started, self.validating_s, self.tokens_at_start = time.monotonic(), 0.0, self._tokens(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            self.losses.append(float(loss))
        if batch_idx + 1 < trainer.num_training_batches and self.due():  # the epoch's last line comes with val loss
            self._print(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module):
        self.validation_started = time.monotonic()

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:  # the sanity check runs before on_train_start
            self.validating_s += time.monotonic() - self.validation_started

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics
        self._print(trainer, pl_module, {name[4:]: value for name, value in metrics.items() if name.startswith("val/")})
        self.due = Every(self.every_s)  # the next periodic line comes every_s after this one

    def _print(self, trainer, pl_module, validation: dict | None = None) -> None:
        if not trainer.is_global_zero:  # one line per step of the run, not one per rank
            return
        training_s = time.monotonic() - self.started - self.validating_s
        step, total = trainer.global_step, trainer.estimated_stepping_batches  # total: inf for a loader without len
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}", f"step {step}{'' if math.isinf(total) else f'/{total}'}"]
        if self.losses:
            parts.append(f"loss {sum(self.losses) / len(self.losses):.4f}")
        for name, value in (validation or {}).items():  # val loss, and the task's metric (training.selection)
            parts.append(f"val {name} {float(value):.4f}")
        tokens = self._tokens(pl_module)
        if tokens is not None and training_s > 0:
            parts.append(f"{(tokens - self.tokens_at_start) / training_s:.0f} tokens/s")
        parts.append(f"{clock(training_s)} elapsed")
        if 0 < step < total and not math.isinf(total):
            parts.append(f"ETA {clock(training_s / step * (total - step))}")
        print("train: " + ", ".join(parts), flush=True)
        self.losses = []

    @staticmethod
    def _tokens(pl_module) -> int | None:
        return getattr(pl_module, "tokens_seen", None)  # counted by training.module.FineTuner
