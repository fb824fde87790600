"""One run, top to bottom: data -> model -> base score -> fit -> tuned score -> outputs.

The config's task (classification, Q&A) owns the data and how answers are judged; its method (LoRA, prompting, a new
head) owns the model. Both are instantiated from the config (`_target_`), so this story has no branch on either.
"""

from functools import partial
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from llmtune.config import build_components
from llmtune.data.prompts import PromptFormat
from llmtune.models.loader import prepare_model_dir
from llmtune.run_outputs import write_run
from llmtune.run_state import cached, last_checkpoint
from llmtune.tracking import final_metrics, public_config
from llmtune.training.distributed import describe_split, is_rank_zero
from llmtune.training.selection import ModelSelection, score
from llmtune.training.setup import instantiate_each, make_trainer
from llmtune.training.timing import Stopwatch


def run(cfg: DictConfig) -> float | None:
    clock = Stopwatch()
    task, method = build_components(cfg)  # every config problem is one line here, before any model loads
    run_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, verbose=False)  # data split, demonstrations, LoRA init and order follow the seed

    # Data: the task's rows, split as the data gives it or drawn with the seed (read before any model loads).
    splits = task.load_splits(cfg.seed)
    describe_split(splits)  # its digest in the log: every rank of a distributed run draws the same split

    # Model: local files (converted once from GGUF, built, or from the HF cache) -> the method's model. Texts are cut
    # to dataset.max_input_tokens of its tokens; rag=true then puts retrieved context (document chunks for Q&A, the
    # nearest labelled training examples for classification) into every row; prompts in the model family's format
    # (fewshot adds its demonstrations).
    method.build(cfg.model, task, prepare_model_dir(cfg.model, cfg.paths.cache_dir))
    task.limit_input_length(splits, method.tokenizer)
    retrieval = task.add_context(splits, cfg.retriever, cfg.paths.cache_dir) if cfg.rag else None
    zero_shot = PromptFormat.from_config(cfg.model, cfg.dataset, method.tokenizer)
    prompts = method.prompt_format(zero_shot, task, splits, cfg.seed)
    clock.lap("prepare")

    # Base: the untuned model, zero-shot (a new classification head has no untuned answer: None); kept on disk, so a
    # resumed run does not score it again. Scored by rank 0 alone, as is everything after training.
    base = cached(run_dir / "base_predictions.jsonl", lambda: method.base_predictions(
        task, splits["test"], zero_shot, cfg.eval)) if cfg.eval.baseline and is_rank_zero() else None
    clock.lap("eval_base")

    # Train, scoring the validation rows by the task's metric at each validation; trainer.select=best then puts back
    # the weights of the best validation score (early stopping and trainer.max_time may end training sooner).
    logger = instantiate(cfg.logger)
    logger.log_hyperparams(public_config(cfg))  # secrets masked; W&B shows it as the run's config
    val_rows = splits["val"][:cfg.trainer.val_score_rows]
    selection = ModelSelection(cfg.trainer, run_dir, task, val_rows and partial(
        score, task, method, val_rows, prompts, cfg.eval, "scoring validation"))
    # Selection's callbacks first: Lightning runs checkpoint callbacks in list order, and last.ckpt must hold the
    # best score so far.
    new_trainer = partial(make_trainer, cfg.trainer, run_dir, logger,
                          [*selection.callbacks, *instantiate_each(cfg.callbacks)])
    training = method.fit(task, splits, prompts, cfg.trainer, cfg.seed, new_trainer, last_checkpoint(run_dir),
                          selection)
    clock.lap("train")
    if not is_rank_zero():  # the other ranks of trainer=ddp trained their shard of every epoch; their work is done
        return None

    # The method's model (its adapter folded into the weights: nothing trains any more) on val (what sweeps optimise:
    # tuning on test would flatter it) and on test; temperature scaling fitted on val (classification) rescales the
    # confidences, never the predicted labels.
    with method.inference_weights():
        val = splits["val"] and method.predictions(task, splits["val"], prompts, cfg.eval,
                                                   f"scoring {method.name} (val)")
        tuned = method.predictions(task, splits["test"], prompts, cfg.eval, f"scoring {method.name}")
    calibration = task.fit_calibration(val)
    results = {"val": task.metrics(task.calibrate(val, calibration))} if val else {}
    predictions = {"tuned": task.calibrate(tuned, calibration), "base": base}
    results.update({name: task.test_metrics(rows) for name, rows in predictions.items() if rows is not None})
    if retrieval is not None:
        retrieval.update(task.retrieval_quality(splits["test"]))
    clock.lap("eval_tuned")
    logged = final_metrics(results)
    logger.log_metrics(logged, step=training["steps"])
    logger.save()

    # Write: the method's weights (adapter/ or model/), then predictions, metrics, report, plots, console table.
    method.save(run_dir)
    summary = {
        "run": {"model": cfg.model.name, "method": method.name, "dataset": cfg.dataset.name, "rag": cfg.rag,
                "task": task.name, "seed": cfg.seed, **method.describe(cfg.model),
                **{f"n_{name}": len(rows) for name, rows in splits.items()}},
        "data": task.data_counts, "results": results, "calibration": calibration, "retrieval": retrieval,
        "logged": logged, "train": training,
        "timing_s": clock.laps(),
    }
    write_run(run_dir, summary, predictions, splits["test"], prompts, task)
    return results["tuned"][task.headline]
