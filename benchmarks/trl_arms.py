"""TRL baselines for the speed benchmark: SFTTrainer + PEFT LoRA training, and generate-then-parse classification.

The orchestrator imports this module and calls each function in a fresh subprocess; importing it has no side effects
(TRL, transformers and PEFT are imported inside the functions).

What TRL (read from trl 1.16.0's source) does with these arms on CPU:

* Both training arms use SFTTrainer on a prompt/completion dataset, so TRL's defaults apply: completion-only loss
  (prompt tokens labelled -100), EOS appended to every completion, right padding by TRL's own collator, bf16 autocast
  (SFTConfig defaults bf16=True; on CPU that is torch.autocast("cpu", bfloat16) and works), gradient checkpointing ON
  (a TRL default, unlike transformers), AdamW (adamw_torch_fused) with linear LR decay.
* TRL 1.16 never builds the [B, L, V] logits: SFTTrainer always patches the model with its fused LM head
  (trl.trainer.utils.add_fused_lm_head), which projects hidden states onto the vocabulary in 32,768-wide tiles and
  folds each tile into an online log-sum-exp. Whether it projects every position or only the positions whose next
  token carries a label is decided by a private gate, trl.trainer.utils._use_triton(device), which is True only on
  CUDA/XPU with Triton. So at the defaults on CPU (arm a) the head projects all B x (L-1) positions (prompt and
  padding included) onto the full 262k vocabulary, tile by tile, and masks afterwards.
* SFTConfig has no public option that changes that: there is no logits_to_keep; completion_only_loss only masks the
  loss; use_liger_kernel is deprecated, needs Triton (GPU) and SFTTrainer refuses its fused cross-entropy;
  padding_free=True (public) only drops padding positions -- prompt positions are still projected, and on this
  benchmark's batches it measured no faster than the defaults.
* compact_logits=True (arm b) therefore switches on TRL's own label-positions-only path, the one TRL runs on CUDA,
  by overriding that private gate for the duration of train() (restored afterwards). Only the choice "project
  hidden_states[mask] instead of every position" changes; the tile kernel keeps its torch CPU fallback
  (trl.kernels.chunked_logprob._use_triton is untouched), and the losses equal arm a's. This is a monkeypatch of a
  private TRL function, not a configuration option; every other setting is identical to arm a. The returned
  "setting" string says exactly what each run used.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

# Steps excluded from the timing: the first steps pay one-off costs (allocator growth, autocast caches, lazy init).
_WARMUP_STEPS = 2


def _load(model_dir: str):
    """Tokenizer and the base model as bf16 weights, the same frozen weights llmtune trains LoRA on."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    return tokenizer, model


def _step_timer():
    """A TrainerCallback that times each optimizer step and counts its non-padding input tokens and loss."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []
            self.losses: list[float] = []
            self._t0 = 0.0
            self._tokens0 = 0

        def on_step_begin(self, args, state, control, **kwargs):
            # The batch is already collated when this fires, so the window is forward + backward + optimizer step.
            self._tokens0 = state.num_input_tokens_seen
            _synchronize(args.device)
            self._t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            # On a GPU the step's kernels may still be queued here; the loss is read (a sync) only after this hook.
            _synchronize(args.device)
            self.seconds.append(time.perf_counter() - self._t0)
            # Trainer adds the step's non-padding token count (include_num_input_tokens_seen="non_padding") after
            # the backward pass and before this hook, so the difference is this step's count.
            self.tokens.append(state.num_input_tokens_seen - self._tokens0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # logging_steps=1, so every step logs its own training loss.
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def _synchronize(device) -> None:
    """Wait for the device's queued kernels (CUDA only; CPU work is synchronous)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _label_positions_only_head(enabled: bool) -> Iterator[None]:
    """While active, TRL's fused LM head projects only label positions on CPU too (see the module docstring).

    The fused forward looks up trl.trainer.utils._use_triton at call time, so replacing that module attribute flips
    its "compact" choice; the kernel module keeps its own reference and still runs the torch fallback on CPU.
    """
    if not enabled:
        yield
        return
    from trl.trainer import utils as trl_utils

    original = trl_utils._use_triton
    trl_utils._use_triton = lambda device: device.type == "cpu" or original(device)
    try:
        yield
    finally:
        trl_utils._use_triton = original


def train_trl(model_dir: str, prompts: list[str], answers: list[str], batch_size: int, steps: int,
              compact_logits: bool, lora: dict, lr: float = 2e-4,
              sft_overrides: dict[str, Any] | None = None, warmup_steps: int = _WARMUP_STEPS) -> dict:
    """TRL SFTTrainer + PEFT on prompt/completion pairs.

    Returns {"tokens_per_s", "s_per_step", "steps", "tokens", "losses", "setting"} plus "timed_steps" and
    "step_seconds". tokens_per_s = non-padding input tokens of the timed steps / summed seconds of the timed steps;
    s_per_step is the median over the timed steps; "tokens" counts the timed steps only, "steps" is every step run
    (the first min(warmup_steps, steps - 1) are warm-up and not timed). sft_overrides (optional, for experiments)
    are extra SFTConfig fields applied last, e.g. {"gradient_checkpointing": False}, or {"use_cpu": False} to train on
    a GPU; they are listed in "setting".
    """
    import datasets
    import peft
    import transformers
    import trl
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import utils as trl_utils

    tokenizer, model = _load(model_dir)
    dataset = datasets.Dataset.from_dict({"prompt": list(prompts), "completion": list(answers)})

    timer = _step_timer()
    with tempfile.TemporaryDirectory(prefix="trl_arm_") as output_dir:
        settings = {
            "per_device_train_batch_size": batch_size, "max_steps": steps, "learning_rate": lr, "logging_steps": 1,
            "report_to": "none", "save_strategy": "no", "output_dir": output_dir, "use_cpu": True, "seed": 0,
            # Instrumentation only: Trainer sums attention_mask (or non-pad input_ids when padding-free) per batch.
            "include_num_input_tokens_seen": "non_padding",
        }
        args = SFTConfig(**{**settings, **(sft_overrides or {})})  # overrides win, use_cpu included
        # LoRA A matrices are initialised inside SFTTrainer.__init__, before Trainer seeds anything; seed here so
        # that repeated runs start from the same adapter.
        transformers.set_seed(0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **lora), callbacks=[timer])
        with _label_positions_only_head(enabled=compact_logits):
            trainer.train()
            # Read inside the context, so the setting reports what the head did during training.
            head_scope = ("label positions only" if trl_utils._use_triton(trainer.model.device)
                          else "every position incl. prompt" + ("" if trainer.padding_free else " and padding"))

    warmup = min(warmup_steps, max(len(timer.seconds) - 1, 0))
    timed_s, timed_tok = timer.seconds[warmup:], timer.tokens[warmup:]

    parts = [
        f"TRL {trl.__version__} SFTTrainer + PEFT LoRA(r={lora.get('r')}, target_modules={lora.get('target_modules')})",
        ("compact_logits=on: TRL's label-positions-only LM-head path, forced on CPU by patching the private gate "
         "trl.trainer.utils._use_triton (no public SFTConfig option does this)") if compact_logits
        else "compact_logits=off (TRL defaults)",
        f"fused chunked LM head (no [B,L,V] logits) over {head_scope}, full vocab",
        f"padding_free={trainer.padding_free}",
        f"packing={args.packing}",
        f"use_liger_kernel={args.use_liger_kernel}",
        f"attention={getattr(trainer.model.config, '_attn_implementation', None)}",
        f"completion_only_loss={trainer.completion_only_loss}",
        "EOS appended to completion",
        f"bf16 autocast={args.bf16}",
        f"gradient_checkpointing={args.gradient_checkpointing}",
        f"optim={_name(args.optim)}, lr_scheduler={_name(args.lr_scheduler_type)}",
    ]
    if sft_overrides:
        parts.append(f"SFTConfig overrides={sft_overrides}")
    setting = "; ".join(parts)
    return {
        "tokens_per_s": sum(timed_tok) / sum(timed_s) if timed_s else float("nan"),
        "s_per_step": statistics.median(timed_s) if timed_s else float("nan"),
        "steps": len(timer.seconds),
        "timed_steps": len(timed_s),
        "tokens": sum(timed_tok),
        "step_seconds": timer.seconds,
        "losses": timer.losses,
        "setting": setting,
    }


def base_vs_adapter_generation(model_dir: str, adapter_dir: str, prompts: list[str], batch_size: int = 16,
                               max_new_tokens: int = 32, rounds: int = 2, contiguous_head_input: bool = True,
                               merged: bool = True) -> dict:
    """Greedy generation speed of the bare base model against the same base with a LoRA adapter, in one process:
    "adapter" is PeftModel, unmerged (what generation with a 4-bit base, or any plain PEFT user, runs through);
    "merged" (with merged=True) the adapter folded into the weights by PEFT's merge_and_unload, as llmtune's
    evaluation after training, predict and serve generate.

    Each round generates every batch of prompts (batch_size, left-padded, greedy, up to max_new_tokens) with every arm
    back to back, the arms' order rotating from batch to batch, so that a shared machine's changing load falls on all
    alike; one warm-up batch per arm goes untimed first. Returns, per arm, {"tokens_per_s", "sentences_per_s",
    "seconds", "tokens"}, where tokens are each row's generated tokens up to and including its first EOS (after it a
    row is only padding); per arm but the base, "<arm>_slowdown": the median over batches of the arm's seconds per
    token over the base's (robust to a burst of load on one batch), and "<arm>_slowdown_total", the totals' ratio;
    "deterministic": every round generated the same texts, per arm; "generations": each arm's decoded texts (greedy:
    "merged" equals "adapter" up to bf16 rounding of the folded weights); and "setting".

    contiguous_head_input=False leaves llmtune's fix of torch's unfolded LM-head matmul
    (llmtune.models.loader.keep_head_input_contiguous) off the adapter arms: the "before" figure, whose generations
    equal the fixed arms'. The base arm is loaded as plain transformers loads it (weights that require grad), which
    torch folds either way. On a 2-core CPU shared with other jobs the two-thread ratios swung from 0.8x to 2.8x
    between runs; under torch.set_num_threads(1) they held steady.
    """
    import torch
    from peft import PeftModel

    tokenizer, base = _load(model_dir)
    models = {"base": base}
    for name in ("adapter", "merged") if merged else ("adapter",):
        adapted = PeftModel.from_pretrained(_load(model_dir)[1], adapter_dir)
        models[name] = adapted.merge_and_unload() if name == "merged" else adapted
    if contiguous_head_input:
        from llmtune.models.loader import keep_head_input_contiguous

        for name in models.keys() - {"base"}:
            keep_head_input_contiguous(models[name])
    for model in models.values():
        model.eval()
    tokenizer.padding_side = "left"  # generation appends on the right: every row's last prompt token must be last
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = base.generation_config.eos_token_id
    eos_ids = torch.tensor(eos_ids if isinstance(eos_ids, list) else [eos_ids])
    batches = [tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
               for i in range(0, len(prompts), batch_size)]

    def generate(model, enc) -> tuple[list[str], int, float]:
        start = time.perf_counter()
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        seconds = time.perf_counter() - start
        ended = torch.isin(new, eos_ids)
        lengths = torch.where(ended.any(1), ended.int().argmax(1) + 1, new.shape[1])
        return texts, int(lengths.sum()), seconds

    names = list(models)
    seconds, tokens = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
    texts: dict[str, list[list[str]]] = {name: [] for name in names}  # per round
    ratios: dict[str, list[float]] = {name: [] for name in names[1:]}  # per batch: seconds per token over the base's
    with torch.inference_mode():
        for model in models.values():
            generate(model, batches[0])
        for round_ in range(rounds):
            for name in names:
                texts[name].append([])
            for index, enc in enumerate(batches):
                shift = (round_ * len(batches) + index) % len(names)
                per_token = {}
                for name in names[shift:] + names[:shift]:
                    batch_texts, batch_tokens, batch_seconds = generate(models[name], enc)
                    texts[name][-1].extend(batch_texts)
                    seconds[name] += batch_seconds
                    tokens[name] += batch_tokens
                    per_token[name] = batch_seconds / batch_tokens
                for name, arm_ratios in ratios.items():
                    arm_ratios.append(per_token[name] / per_token["base"])
    arms = {name: {"tokens_per_s": tokens[name] / seconds[name],
                   "sentences_per_s": rounds * len(prompts) / seconds[name],
                   "seconds": seconds[name], "tokens": tokens[name]} for name in names}
    slowdowns = {}
    for name, arm_ratios in ratios.items():
        slowdowns[f"{name}_slowdown"] = statistics.median(arm_ratios)
        slowdowns[f"{name}_slowdown_total"] = arms["base"]["tokens_per_s"] / arms[name]["tokens_per_s"]
    return {**arms, **slowdowns,
            "deterministic": all(all(t == runs[0] for t in runs) for runs in texts.values()),
            "generations": {name: runs[-1] for name, runs in texts.items()},
            "setting": f"bf16, batch {batch_size}, greedy, max_new_tokens={max_new_tokens}, {rounds} rounds; "
                       f"adapter: PeftModel unmerged{'; merged: merge_and_unload' if merged else ''}; "
                       f"contiguous_head_input={contiguous_head_input}"}

def _name(option: Any) -> str:
    """Plain value of a TrainingArguments enum field, e.g. OptimizerNames.ADAMW_TORCH_FUSED -> adamw_torch_fused."""
    return str(getattr(option, "value", option))


def _first_label(text: str, labels: list[str]) -> str | None:
    """The allowed label that occurs earliest in text (case-insensitive); the longer one wins a tie; else None."""
    lowered = text.lower()
    hits = [(lowered.find(label.lower()), -len(label), label) for label in labels if label.lower() in lowered]
    return min(hits)[2] if hits else None


def generate_and_parse(model_dir: str, prompts: list[str], labels: list[str], batch_size: int,
                       max_new_tokens: int = 4, adapter_dir: str | None = None,
                       contiguous_head_input: bool = False) -> dict:
    """Classification the usual way: greedy generate after each prompt, decode the new tokens, parse a label.

    Returns {"sentences_per_s", "predictions", "unparseable"} plus "seconds" and the decoded "generations". A
    label counts when it appears anywhere in the decoded text (earliest wins). The clock covers tokenising, generating
    and decoding every prompt after one untimed one-token warm-up generate; model loading is not timed.

    With adapter_dir the frozen base under PeftModel pays torch's unfolded LM-head matmul at every prefill (a
    weight-sized copy per batch, see llmtune.models.loader.keep_head_input_contiguous), as stock transformers + PEFT
    do; contiguous_head_input=True applies llmtune's fix for it.
    """
    import torch

    tokenizer, model = _load(model_dir)
    if adapter_dir:  # a run's LoRA adapter, so the model answers with labels
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    if contiguous_head_input:
        from llmtune.models.loader import keep_head_input_contiguous

        keep_head_input_contiguous(model)
    model.eval()
    # Decoder-only batched generation must be left-padded so every row's new tokens follow its last prompt token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    greedy = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def generate(batch: list[str], new_tokens: int) -> list[str]:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=new_tokens, **greedy)
        return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    with torch.inference_mode():
        generate(prompts[:1], 1)  # warm-up, untimed
        start = time.perf_counter()
        texts: list[str] = []
        for i in range(0, len(prompts), batch_size):
            texts.extend(generate(prompts[i:i + batch_size], max_new_tokens))
        seconds = time.perf_counter() - start

    predictions = [_first_label(text, labels) for text in texts]
    return {
        "sentences_per_s": len(prompts) / seconds,
        "predictions": predictions,
        "unparseable": sum(p is None for p in predictions),
        "seconds": seconds,
        "generations": texts,
    }
