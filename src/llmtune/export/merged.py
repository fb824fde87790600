"""format=merged: the adapter folded into its base, saved as sharded safetensors that plain transformers loads
(AutoModelForCausalLM; for a classification-head run AutoModelForSequenceClassification, the trained head and the
label words as id2label included)."""

import json
import shutil
from pathlib import Path

import torch

from llmtune.data.prompts import PROMPT_FILE
from llmtune.inference import load_run
from llmtune.models.loader import as_plain_tensors


def export_merged(run_dir: Path, out_dir: Path, dtype: str | None = None, max_shard_size: str = "1GB",
                  trust_remote_code: bool = False) -> Path:
    """Write the merged model into out_dir (a staging folder: the caller makes it the target only once complete).
    Merge in fp32 (a bf16 sum would round most of the adapter's small update away), then save in dtype
    (default: the dtype the run scored in). A QLoRA base is de-quantised first: merging into 4-bit weights would
    round the adapter away entirely."""
    loaded = load_run(run_dir, dtype="float32", dequantize=True, trust_remote_code=trust_remote_code)
    model = loaded.model
    if hasattr(model, "merge_and_unload"):  # a PeftModel; zeroshot/fewshot runs have no adapter to merge
        model = model.merge_and_unload()  # a head's trained copy (PEFT's modules_to_save) replaces the fresh one
    model = as_plain_tensors(model)  # a de-quantised QLoRA base: save plain tensors, no bitsandbytes marker
    dtype = dtype or loaded.method.run_dtype(loaded.cfg.model)
    model = model.to(getattr(torch, dtype))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size)
    loaded.tokenizer.save_pretrained(out_dir)
    # The run's prompt travels with the model: a user of the folder prompts it as it was tuned (a head reads no prompt).
    if loaded.method.prompted and (run_dir / PROMPT_FILE).is_file():
        shutil.copy(run_dir / PROMPT_FILE, out_dir / PROMPT_FILE)
    (out_dir / "llmtune_export.json").write_text(json.dumps({
        "run": str(run_dir), "model": loaded.cfg.model.name, "method": loaded.cfg.method.name,
        "dataset": loaded.cfg.dataset.name, "dtype": dtype, "labels": loaded.labels}, indent=2) + "\n")
    return out_dir
