"""One run, top to bottom: data -> model -> base score -> fit -> tuned score -> outputs."""

import time
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from llmtune.config import check_config
from llmtune.data.loading import load_rows, split_per_class
from llmtune.data.prompts import PromptFormat
from llmtune.evaluation.metrics import classification_metrics
from llmtune.evaluation.scoring import classify
from llmtune.models.loader import load_base_model, prepare_model_dir
from llmtune.models.lora import add_lora, lora_settings
from llmtune.report import outputs
from llmtune.tracking import final_metrics, public_config
from llmtune.training.module import LoraFineTuner
from llmtune.training.setup import encode_rows, make_loaders, make_trainer


def run(cfg: DictConfig) -> float:
    started = time.perf_counter()
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, verbose=False)  # data order, LoRA init and dropout all follow the seed
    labels = list(cfg.dataset.labels)

    # Data: rows -> stratified seeded split -> prompts (model's format) -> tokens (method decides the loss mask).
    splits = split_per_class(load_rows(cfg.dataset), labels, cfg.dataset.split, cfg.seed)
    prompt_format = PromptFormat.from_config(cfg.model, cfg.dataset)

    # Model: local files (converted once from GGUF, or built) -> frozen base -> LoRA adapters.
    tokenizer, base_model = load_base_model(prepare_model_dir(cfg.model, cfg.paths.cache_dir), cfg.model)
    model = add_lora(base_model, cfg.model, cfg.method)
    model.print_trainable_parameters()
    timing = {"prepare": time.perf_counter() - started}

    def score(desc, split="test"):
        return classify(model, tokenizer, splits[split], prompt_format, labels, cfg.eval.batch_size, desc)

    results, base_predictions = {}, None
    if cfg.eval.baseline:
        tick = time.perf_counter()
        with model.disable_adapter():
            base_predictions = score("scoring base model")
        results["base"] = _metrics(base_predictions, labels)
        timing["eval_base"] = time.perf_counter() - tick

    # Fit: one LightningModule for every method; checkpoints keep the adapter weights only.
    train_loader, val_loader = make_loaders(
        encode_rows(splits["train"], tokenizer, prompt_format, cfg.method.loss_on),
        encode_rows(splits["val"], tokenizer, prompt_format, cfg.method.loss_on),
        cfg.trainer, tokenizer.pad_token_id, cfg.seed)
    module = LoraFineTuner(model, **OmegaConf.to_container(cfg.method.optimizer, resolve=True))
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(public_config(cfg))  # secrets masked; W&B shows it as the run's config
    trainer = make_trainer(cfg.trainer, run_dir, logger,
                           [ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last")])
    tick = time.perf_counter()
    trainer.fit(module, train_loader, val_loader)
    timing["train"] = time.perf_counter() - tick

    # Validation accuracy is what sweeps optimise: picking hyper-parameters on test would flatter the test score.
    tick = time.perf_counter()
    if splits["val"]:
        results["val"] = _metrics(score("scoring tuned model (val)", "val"), labels)
    tuned_predictions = score("scoring tuned model")
    results["tuned"] = _metrics(tuned_predictions, labels)
    timing["eval_tuned"] = time.perf_counter() - tick
    logged = final_metrics(results)
    logger.log_metrics(logged, step=trainer.global_step)
    logger.save()

    # Write: adapter (loads with PeftModel.from_pretrained), predictions, metrics, report, plot, console table.
    model.save_pretrained(run_dir / "adapter")
    timing["total"] = time.perf_counter() - started
    summary = {
        "run": {"model": cfg.model.name, "method": cfg.method.name, "dataset": cfg.dataset.name, "rag": cfg.rag,
                "seed": cfg.seed, "n_train": len(splits["train"]), "n_val": len(splits["val"]),
                "n_test": len(splits["test"]), "lora": lora_settings(cfg.model, cfg.method)},
        "results": results,
        "logged": logged,
        "train": {"epochs": trainer.current_epoch, "steps": trainer.global_step, "tokens": module.tokens_seen,
                  "tokens_per_s": module.tokens_seen / timing["train"]},
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
    }
    outputs.write_predictions(run_dir, tuned_predictions, base_predictions)
    figures = outputs.plot_confusion(run_dir, results)
    outputs.write_metrics(run_dir, summary)
    outputs.write_report(run_dir, summary, figures)
    outputs.print_summary(summary, run_dir)
    return results["tuned"]["accuracy"]


def _metrics(predictions: list[dict], labels: list[str]) -> dict:
    return classification_metrics([p["predicted"] for p in predictions], [p["gold"] for p in predictions], labels)
