"""Model selection on validation by the task's own metric: at each validation (every epoch, or every
trainer.val_check_interval batches) the validation rows are scored as the test rows will be (label scoring, or for Q&A
generated answers) and logged as val/<metric>; Lightning's ModelCheckpoint keeps the best of them and EarlyStopping
may end training; with trainer.select=best the best checkpoint's weights are put back before the test is scored."""

from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

# trainer/ keys read here, not passed to Lightning's Trainer
SELECTION_KEYS = ("select", "early_stopping", "val_score_rows")
SELECT_CHOICES = ("best", "last")


class ValidationScore(L.Callback):
    """Logs score()'s metrics named in `names` as val/<name> at each validation (the sanity check excluded)."""

    def __init__(self, score: Callable[[], dict], names: tuple[str, ...]):
        self.score, self.names = score, names

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = self.score()
        pl_module.log_dict({f"val/{name}": float(metrics[name]) for name in self.names
                            if metrics.get(name) is not None}, sync_dist=True)  # equal on every rank: all score all


class ModelSelection:
    """The callbacks that score, keep and (trainer.early_stopping.patience) stop on the validation metric `monitor`, and after
    training the restore of the selected weights."""

    def __init__(self, trainer_cfg: DictConfig, run_dir: Path, task, score: Callable[[], dict] | None):
        # monitored: the task's headline metric; logged besides: the first two of its report (accuracy, macro-F1)
        self.select, self.metric = trainer_cfg.select, task.headline
        names = tuple(dict.fromkeys((task.headline, *task.report_metrics[:2])))
        self.patience = trainer_cfg.early_stopping.patience
        self.best = None
        if not score:  # no validation rows: nothing to score, the last weights are what there is
            self.callbacks = []
            return
        monitor = f"val/{self.metric}"
        self.best = ModelCheckpoint(dirpath=Path(run_dir) / "checkpoints", filename="best-{step}", monitor=monitor,
                                    mode="max", save_top_k=1, save_weights_only=True, enable_version_counter=False,
                                    auto_insert_metric_name=False)
        self.callbacks = [ValidationScore(score, names), self.best]
        if self.patience is not None:
            self.callbacks.append(EarlyStopping(monitor=monitor, mode="max", patience=self.patience))

    def restore(self, model) -> dict:
        """With select=best, the best validation checkpoint's trainable weights loaded into model (the FineTuner's
        `model`); what was selected, for metrics.json."""
        if self.best is None or not self.best.best_model_path:
            return {"select": "last", "why": "no validation score was logged" if self.select == "best" else None}
        checkpoint = torch.load(self.best.best_model_path, map_location="cpu", weights_only=False)
        chosen = {"best_step": int(checkpoint["global_step"]),
                  f"best_val_{self.metric}": float(self.best.best_model_score)}
        if self.select == "last":
            return {"select": "last", **chosen}
        weights = {key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items()}
        missing = set(weights) - set(dict(model.named_parameters()))
        if missing:
            raise RuntimeError(f"best checkpoint {self.best.best_model_path} has weights the model lacks: "
                               f"{sorted(missing)[:3]}")
        model.load_state_dict(weights, strict=False)
        return {"select": "best", **chosen}


def score(task, method, rows: list[dict], prompt_format, eval_cfg: DictConfig, desc: str) -> dict:
    """The task's metrics of the method's current model on rows, as the test will be scored."""
    return task.metrics(method.predictions(task, rows, prompt_format, eval_cfg, desc))
