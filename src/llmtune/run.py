"""One run, top to bottom: data -> model -> base score -> fit -> tuned score -> outputs."""

import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from llmtune.classifier import classifier_loaders, classify_with_head, encode_texts, head_loss, load_classifier
from llmtune.config import check_config
from llmtune.data.loading import load_rows, split_per_class
from llmtune.data.qa import load_qa_rows, split_rows
from llmtune.data.prompts import PromptFormat, with_demonstrations
from llmtune.evaluation.generation import answer_questions, qa_metrics
from llmtune.evaluation.metrics import classification_metrics
from llmtune.evaluation.scoring import classify
from llmtune.models.loader import load_base_model, prepare_model_dir
from llmtune.models.lora import add_lora, lora_settings
from llmtune.rag.context import add_document_context, add_example_context, recall_at_k
from llmtune.report import outputs
from llmtune.tracking import final_metrics, public_config
from llmtune.training.module import FineTuner, next_token_loss
from llmtune.training.setup import encode_rows, make_loaders, make_trainer


def run(cfg: DictConfig) -> float:
    started = time.perf_counter()
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, verbose=False)  # data split, demonstrations, LoRA init and order follow the seed
    method, qa = cfg.method, cfg.dataset.task == "qa"
    labels = None if qa else list(cfg.dataset.labels)

    # Data: rows -> seeded split (stratified by label for classification) -> rag=true: retrieved context per row,
    # document chunks for Q&A, the nearest labelled training examples for classification.
    splits = (split_rows(load_qa_rows(cfg.dataset), cfg.dataset.split, cfg.seed) if qa else
              split_per_class(load_rows(cfg.dataset), labels, cfg.dataset.split, cfg.seed))
    retrieval = None
    if cfg.rag:
        retrieval = (add_document_context(splits, cfg.retriever, cfg.dataset, cfg.paths.cache_dir) if qa else
                     add_example_context(splits, cfg.retriever, cfg.paths.cache_dir))

    # Model: local files (converted once from GGUF, built, or from the HF cache) -> the method's trainable model:
    # LoRA on a frozen base (4-bit for qlora), the bare base (prompting baselines), or a new classification head.
    model_dir = prepare_model_dir(cfg.model, cfg.paths.cache_dir)
    if method.head == "classifier":
        tokenizer, model = load_classifier(cfg.model, method, labels, model_dir)
    else:
        tokenizer, model = load_base_model(model_dir, cfg.model, method.quantization)
        model = add_lora(model, cfg.model, method) if method.train else model
        if method.train:
            model.print_trainable_parameters()
    # Prompts in the model family's format; fewshot puts labelled training rows in front of every test row.
    zero_shot = PromptFormat.from_config(cfg.model, cfg.dataset, tokenizer)
    prompts = (with_demonstrations(zero_shot, splits["train"], labels, seed=cfg.seed, **method.demonstrations)
               if method.demonstrations else zero_shot)
    timing = {"prepare": time.perf_counter() - started}

    def score(desc, split="test", prompt_format=prompts):
        if qa:  # generated answers, judged against the references
            return answer_questions(model, tokenizer, splits[split], prompt_format, cfg.eval.generation,
                                    cfg.eval.batch_size, desc)
        if method.head == "classifier":  # the head reads the raw text: no prompt
            return classify_with_head(model, tokenizer, splits[split], labels, cfg.eval.batch_size,
                                      method.max_length, desc)
        return classify(model, tokenizer, splits[split], prompt_format, labels, cfg.eval.batch_size, desc)

    # Base: the untuned model, zero-shot (with LoRA attached, the adapter is switched off). A new classification
    # head has no untuned answer to compare with: its base column stays empty.
    predictions = {}
    if cfg.eval.baseline and method.head == "lm":
        tick = time.perf_counter()
        with model.disable_adapter() if method.train else nullcontext():
            predictions["base"] = score("scoring base model", prompt_format=zero_shot)
        timing["eval_base"] = time.perf_counter() - tick

    logger = instantiate(cfg.logger)
    logger.log_hyperparams(public_config(cfg))  # secrets masked; W&B shows it as the run's config
    training = {"epochs": 0, "steps": 0, "tokens": 0, "tokens_per_s": 0.0}
    if method.train:  # one LightningModule for every method; checkpoints keep the adapter weights only
        tick = time.perf_counter()
        training = fit(cfg, model, tokenizer, prompts, splits, logger, run_dir)
        timing["train"] = time.perf_counter() - tick
        training["tokens_per_s"] = training["tokens"] / timing["train"]

    # Method's model on val (what sweeps optimise: tuning on test would flatter it) and test. Zero-shot is the base.
    tick = time.perf_counter()
    def metrics(rows):
        return qa_metrics(rows) if qa else classification_metrics(
            [p["predicted"] for p in rows], [p["gold"] for p in rows], labels)

    results = {"val": metrics(score(f"scoring {method.name} (val)", "val"))} if splits["val"] else {}
    same_as_base = not method.train and not method.demonstrations and "base" in predictions
    predictions["tuned"] = predictions["base"] if same_as_base else score(f"scoring {method.name}")
    results.update({name: metrics(rows) for name, rows in predictions.items()})
    if retrieval is not None:  # what the retriever found, the same for every model scored on these rows
        retrieval.update(recall_at_k(splits["test"]) if qa else {})
    timing["eval_tuned"] = time.perf_counter() - tick
    logged = final_metrics(results)
    logger.log_metrics(logged, step=training["steps"])
    logger.save()

    # Write: adapter (loads with PeftModel.from_pretrained) or, fully fine-tuned, the whole model; predictions,
    # metrics, report, plot, console table.
    full = method.get("full_finetune", False)
    if method.train:
        model.save_pretrained(run_dir / ("model" if full else "adapter"))
        if full:
            tokenizer.save_pretrained(run_dir / "model")
    timing["total"] = time.perf_counter() - started
    summary = {
        "run": {"model": cfg.model.name, "method": method.name, "dataset": cfg.dataset.name, "rag": cfg.rag,
                "task": cfg.dataset.task, "seed": cfg.seed, "trained": bool(method.train), "n_train": len(splits["train"]),
                "n_val": len(splits["val"]), "n_test": len(splits["test"]),
                "lora": lora_settings(cfg.model, method) if method.train and not full else None},
        "results": results,
        "retrieval": retrieval,
        "logged": logged,
        "train": training,
        "timing_s": {k: round(v, 1) for k, v in timing.items()},
    }
    outputs.write_prompt(run_dir, prompts)  # predict, serve and export prompt exactly as this run did
    records = outputs.write_predictions(run_dir, predictions["tuned"], predictions.get("base"), splits["test"])
    figures = [] if qa else outputs.plot_confusion(run_dir, results, outputs.method_label(summary["run"]))
    outputs.write_metrics(run_dir, summary)
    outputs.write_report(run_dir, summary, figures, records)
    outputs.print_summary(summary, run_dir)
    return results["tuned"]["rougeL" if qa else "accuracy"]


def fit(cfg: DictConfig, model, tokenizer, prompts: PromptFormat, splits: dict, logger, run_dir: Path) -> dict:
    if cfg.method.head == "classifier":  # raw text -> label index, cross-entropy of the head (rag is not read)
        def encode(rows):
            return encode_texts(rows, tokenizer, list(cfg.dataset.labels), cfg.method.max_length)
        train_loader, val_loader = classifier_loaders(encode(splits["train"]), encode(splits["val"]), cfg.trainer,
                                                      tokenizer, cfg.seed)
        loss = head_loss
    else:  # prompt + answer tokens, next-token loss where the method puts labels
        train_loader, val_loader = make_loaders(
            encode_rows(splits["train"], tokenizer, prompts, cfg.method.loss_on),
            encode_rows(splits["val"], tokenizer, prompts, cfg.method.loss_on),
            cfg.trainer, tokenizer.pad_token_id, cfg.seed)
        loss = next_token_loss
    module = FineTuner(model, loss=loss, **OmegaConf.to_container(cfg.method.optimizer, resolve=True))
    trainer = make_trainer(cfg.trainer, run_dir, logger,
                           [ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last")])
    trainer.fit(module, train_loader, val_loader)
    return {"epochs": trainer.current_epoch, "steps": trainer.global_step, "tokens": module.tokens_seen}
