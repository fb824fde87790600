"""llmtune vs TRL SFTTrainer on a GPU: tokens/s, MFU and peak memory of LoRA and QLoRA training, side by side.

    python benchmarks/gpu.py                     # CUDA only: Llama-3-8B- and Gemma-2B-shaped models, batch 8 x 512
    python benchmarks/gpu.py --smoke             # any machine, in well under two minutes: the same arms, tiny shapes
    python benchmarks/gpu.py --arms llmtune_lora,trl_default --shapes llama3_8b --steps 13

The models are built from their config in code with random weights (speed does not depend on what the weights are, so
nothing is downloaded): a word-level tokenizer over the model's whole vocabulary, made in code, and the model saved
once per run with save_pretrained, so every arm loads the same weights from disk. The rows are synthetic: a shared
32-token instruction, a text of random words and a 32-token answer (loss on the answer only), each row 64 to 511
tokens long.

Every arm runs in its own fresh process: peak GPU memory is that process's torch.cuda.max_memory_allocated (on a CPU,
its peak RSS from wait4). The llmtune arms call the product's own training path (load_base_model, add_lora,
encode_rows, make_loaders, FineTuner, make_trainer, as benchmarks/speed.py does); the TRL arms are SFTTrainer + PEFT
(benchmarks/trl_arms.py) at TRL's defaults and with TRL's own speed options. The parent prints a table and the targets,
and writes results/gpu.{json,md} (gpu_smoke.* with --smoke).
"""

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
sys.path[:0] = [str(REPO / "src"), str(BENCHMARKS)]

# after the path above: speed.py's LoRA settings and helpers
from speed import LORA, arm_matmul, fit_steps, product_config

SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
GIB = 2**30

# "4N": a token's forward pass costs 2N FLOPs, its backward pass 2N for the activation gradients and, in full
# training, another 2N for the weight gradients (the usual 6N). A frozen base has no weight gradients.
MFU_FORMULA = ("MFU = tokens/s x 4N / peak FLOP/s. N = parameters of the decoder blocks (the embedding table and the "
               "LM head left out); 4N per token = forward 2N + backward 2N for the activation gradients, since the "
               "frozen base has no weight gradients (full training: 6N). LoRA's own matmuls (~0.6% of N at r=16) and "
               "the attention scores (~3% at 512 tokens) are not counted. Tokens are every row's non-padding tokens, "
               "the shared instruction counted in every row.")

# bf16 dense tensor-core peaks from NVIDIA's data sheets (TFLOP/s, no sparsity), matched against
# torch.cuda.get_device_name in this order (the first substring found wins); --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0),
                    ("L40S", 362.0)]


# ---------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    family: str  # "llama" or "gemma": the transformers config class
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    head_dim: int


FULL_SHAPES = {
    "llama3_8b": Shape("llama", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256,
                       head_dim=128),
    "gemma2b": Shape("gemma", hidden=2048, layers=18, heads=8, kv_heads=1, intermediate=16384, vocab=256000,
                     head_dim=256),
}
# The same two families, small enough that every arm runs in seconds on a CPU.
SMOKE_SHAPES = {
    "llama3_8b": Shape("llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=224, vocab=512, head_dim=16),
    "gemma2b": Shape("gemma", hidden=64, layers=2, heads=4, kv_heads=1, intermediate=512, vocab=512, head_dim=16),
}

# Run sizes per profile; every one can be overridden on the command line. Full: ~20 measured steps of 8 x 512 after
# 3 warm-up steps (allocator growth, cuBLAS/Triton autotuning and lazy init land in the first steps).
PROFILES = {
    "full": {"shapes": "llama3_8b,gemma2b", "batch_size": 8, "seq_len": 512, "min_len": 64, "instruction_tokens": 32,
             "answer_tokens": 32, "steps": 23, "warmup": 3, "budget_s": 540.0},
    # one shape by default (--shapes llama3_8b,gemma2b adds the other family): each arm is a fresh interpreter
    "smoke": {"shapes": "llama3_8b", "batch_size": 8, "seq_len": 64, "min_len": 16, "instruction_tokens": 8,
              "answer_tokens": 4, "steps": 3, "warmup": 1, "budget_s": 0.0},
}

# Arms the targets are judged on run first (for every shape), then TRL's speed options, so that a wall budget that runs
# out cuts the extras, not the comparison.
CORE_ARMS = ("llmtune_lora", "trl_default", "llmtune_qlora")
EXTRA_ARMS = ("trl_packing", "trl_padding_free", "trl_liger", "trl_tuned")


def model_config(shape: Shape):
    from transformers import GemmaConfig, LlamaConfig

    config_class = {"llama": LlamaConfig, "gemma": GemmaConfig}[shape.family]
    return config_class(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=8192,
                        pad_token_id=0, bos_token_id=2, eos_token_id=3,
                        tie_word_embeddings=shape.family == "gemma")  # Gemma ties its LM head; Llama 3 does not


# ---------------------------------------------------------------------------------------------------- inputs
def word(index: int) -> str:
    return f"w{index}"


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer whose vocabulary is exactly the model's: the special tokens, then one word per id.

    Whitespace-separated words map one to one onto ids, so a row's length in tokens is its length in words; BOS is
    prepended as the real models' tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocabulary = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocabulary.update({word(i): i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    words = Tokenizer(models.WordLevel(vocab=vocabulary, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins the words back with spaces
    words.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                         special_tokens=[("<bos>", vocabulary["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def synthetic_rows(args, vocab_size: int, count: int, seed: int = 0):
    """(prompt format, rows): one shared instruction, then per row a text of random words and an answer of random
    words. Row lengths (BOS + instruction + text + answer) are uniform in [min_len, seq_len - 1]: TRL appends EOS to
    every completion, which brings its rows to at most seq_len."""
    import random

    from llmtune.data.prompts import PromptFormat

    rng = random.Random(seed)
    first = len(SPECIAL_TOKENS)

    def words(n):
        return " ".join(word(rng.randrange(first, vocab_size)) for _ in range(n))

    instruction = words(args.instruction_tokens)
    fixed = 1 + args.instruction_tokens + args.answer_tokens  # BOS, instruction, answer
    rows = [{"text": words(max(1, rng.randint(args.min_len, args.seq_len - 1) - fixed)),
             "label": words(args.answer_tokens)} for _ in range(count)]
    return PromptFormat(instruction, "{instruction} {input}", " {answer}"), rows


def row_count(args) -> int:
    """Rows enough for every arm's steps: packing puts ~2 rows in a sequence, so 3 batches' worth per step."""
    return 3 * args.batch_size * args.steps


def parameter_counts(model) -> dict:
    """N for the FLOP count (decoder blocks only), counted once on the unquantised model for every arm: a 4-bit
    weight's numel() counts packed bytes, not parameters."""
    total = sum(p.numel() for p in model.parameters())  # a tied LM head is the embedding, counted once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head is embedding
    blocks = total - embedding.numel() - (0 if tied else head.numel())
    return {"params_total": total, "params_blocks": blocks, "lm_head_tied": tied}


# ---------------------------------------------------------------------------------------------------- arms
def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def synchronize() -> None:
    """Wait for queued GPU work, so a step's clock stops when its kernels have run, not when they were queued."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}  # the parent adds the process's peak RSS
    return {"peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def arm_setup(args) -> dict:
    """Build every shape's model with random weights and save it with its tokenizer under args.folder, so every arm
    loads the same weights; without a GPU (and without --peak-tflops), also measure the CPU's bf16 peak for MFU."""
    import torch

    models = {name: save_random_model(shapes(args)[name], Path(args.folder) / name) for name in args.shapes.split(",")}
    if on_cuda():
        return {"models": models, "device": torch.cuda.get_device_name(0)}
    matmul = None if args.peak_tflops else arm_matmul(args)  # speed.py's: the best of 20 bf16 matmuls of 2048^3
    return {"models": models, "device": matmul["cpu"] if matmul else "CPU", "matmul": matmul}


def save_random_model(shape: Shape, folder: Path) -> dict:
    """The model is built on the GPU when there is one (initialising 8B weights on a CPU takes minutes) and freed
    before the next."""
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if on_cuda() else "cpu"):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    word_tokenizer(shape.vocab).save_pretrained(folder)
    counts = parameter_counts(model)
    del model
    if on_cuda():
        torch.cuda.empty_cache()
    return {**counts, "seconds": time.perf_counter() - start}


def lightning_step_timer():
    """A Lightning callback timing each training step (forward, backward, optimizer) and counting its tokens."""
    import lightning as L

    from llmtune.data.prompts import batch_tokens

    class StepTimer(L.Callback):
        def __init__(self):
            self.seconds, self.tokens, self.losses = [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            synchronize()
            self.seconds.append(time.perf_counter() - self.start)
            self.tokens.append(batch_tokens(batch))
            self.losses.append(float(outputs["loss"]))

    return StepTimer()


def timed_summary(seconds: list[float], tokens: list[int], warmup: int) -> dict:
    warmup = min(warmup, len(seconds) - 1)  # as train_trl does: at least one step is timed
    timed_s, timed_tokens = seconds[warmup:], tokens[warmup:]
    return {"tokens_per_s": sum(timed_tokens) / sum(timed_s), "s_per_step": statistics.median(timed_s),
            "steps": len(seconds), "timed_steps": len(timed_s), "tokens": sum(timed_tokens),
            "tokens_per_step": sum(timed_tokens) / len(timed_tokens)}


def llmtune_overrides(args, quantized: bool) -> list[str]:
    """The product's config for this run: the tiny model file supplies a plain prompt format and all-linear LoRA
    targets; the weights, dtype and method come from here."""
    overrides = ["model=tiny", f"model.name={args.shape}", f"model.path={args.folder}", "model.dtype=bfloat16"]
    if quantized:
        # The 12 GiB target at 8 x 512 needs activation checkpointing (without it the 8B's activations alone are
        # ~30 GiB). The shared-instruction cache is switched off with it: under checkpointing transformers drops the
        # cache inside every layer, so the prefix would silently be computed and then not attended to.
        overrides += ["method=qlora", "method.gradient_checkpointing=true", "trainer.share_prefix=false"]
    return overrides + list(args.llmtune_override)


def arm_llmtune(args, quantized: bool) -> dict:
    """The product's training path on the prepared model: bf16 (or 4-bit NF4) frozen base, fp32 LoRA, length pools,
    labelled-position LM head, the shared instruction once per batch."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from llmtune.models.loader import load_base_model, prepare_model_dir
    from llmtune.models.lora import add_lora
    from llmtune.training.setup import encode_rows, make_loaders

    overrides = llmtune_overrides(args, quantized)
    cfg = product_config(SimpleNamespace(data=None, batch_size=args.batch_size), overrides)
    L.seed_everything(0, verbose=False)
    start = time.perf_counter()
    tokenizer, base = load_base_model(prepare_model_dir(cfg.model, cfg.paths.cache_dir), cfg.model,
                                      cfg.method.quantization)
    model = add_lora(base, cfg.model, OmegaConf.create({**OmegaConf.to_container(cfg.method), "lora": LORA}))
    load_s = time.perf_counter() - start
    prompt_format, rows = synthetic_rows(args, vocab_size(args), row_count(args))
    train_loader, _ = make_loaders(encode_rows(rows, tokenizer, prompt_format, cfg.method.loss_on), [], cfg.trainer,
                                   tokenizer.pad_token_id, seed=0)
    timer = lightning_step_timer()
    fit_steps(cfg, model, train_loader, timer, args.steps)
    setting = (f"llmtune {cfg.method.name}: FineTuner + Lightning Trainer as `python -m llmtune` builds them; "
               f"LoRA r={LORA['r']} {LORA['target_modules']}, precision={cfg.trainer.precision}, "
               f"share_prefix={cfg.trainer.share_prefix}, gradient_checkpointing={cfg.method.gradient_checkpointing}, "
               f"optimizer={cfg.method.optimizer._target_}" + (f", {cfg.method.optimizer.get('bits')}-bit"
                                                               if quantized else "")
               + f", attention={base.config._attn_implementation}")
    return {**timed_summary(timer.seconds, timer.tokens, args.warmup), "losses": timer.losses, "load_s": load_s,
            "overrides": overrides, "setting": setting, "threads": torch.get_num_threads(), **peak_memory()}


def liger_usable() -> bool:
    return on_cuda() and importlib.util.find_spec("liger_kernel") is not None


def trl_options(arm: str, args) -> dict:
    """SFTConfig fields each TRL arm sets on top of TRL's defaults (train_trl's own settings aside)."""
    options = {"use_cpu": not on_cuda()}
    if arm in ("trl_packing", "trl_tuned"):
        # best-fit-decreasing packing into sequences of seq_len tokens (TRL makes packed batches padding-free)
        options.update(packing=True, max_length=args.seq_len)
    if arm == "trl_padding_free":
        options.update(padding_free=True, max_length=None)  # TRL refuses max_length with padding-free, unpacked rows
    if arm == "trl_liger" or (arm == "trl_tuned" and liger_usable()):
        options["use_liger_kernel"] = True
    if arm == "trl_tuned":
        options["gradient_checkpointing"] = False  # TRL turns it on by default; memory is not short here
    return options


def arm_trl(args, arm: str) -> dict:
    from trl_arms import train_trl

    prompt_format, rows = synthetic_rows(args, vocab_size(args), row_count(args))
    prompts = [prompt_format.prompt(row["text"]) for row in rows]
    answers = [prompt_format.answer(row["label"]) for row in rows]
    result = train_trl(args.folder, prompts, answers, args.batch_size, args.steps, compact_logits=False, lora=LORA,
                       sft_overrides=trl_options(arm, args), warmup_steps=args.warmup)
    result["tokens_per_step"] = result["tokens"] / max(1, result["timed_steps"])
    return {**result, **peak_memory()}


def vocab_size(args) -> int:
    return shapes(args)[args.shape].vocab


ARMS = {
    "setup": arm_setup,
    "llmtune_lora": lambda args: arm_llmtune(args, quantized=False),
    "llmtune_qlora": lambda args: arm_llmtune(args, quantized=True),
    **{arm: (lambda args, arm=arm: arm_trl(args, arm))
       for arm in ("trl_default", "trl_packing", "trl_padding_free", "trl_liger", "trl_tuned")},
}


# ---------------------------------------------------------------------------------------------------- orchestration
def shapes(args) -> dict[str, Shape]:
    return SMOKE_SHAPES if args.smoke else FULL_SHAPES


def child_argv(args) -> list[str]:
    """The options an arm's process needs to rebuild the same inputs."""
    argv = ["--smoke"] if args.smoke else []
    for option in ("batch_size", "seq_len", "min_len", "instruction_tokens", "answer_tokens", "steps", "warmup"):
        argv.append(f"--{option.replace('_', '-')}={getattr(args, option)}")
    argv += [f"--shapes={args.shapes}"] + ([f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else [])
    return argv + [f"--llmtune-override={o}" for o in args.llmtune_override]


def run_arm(arm: str, args, shape: str | None = None, folder: str | None = None, timeout_s: float | None = None
            ) -> dict:
    """One arm in a fresh interpreter. Peak RSS comes from wait4 (the process's own, KiB on Linux); stderr goes to a
    file whose tail is kept when the arm fails; past timeout_s the process is killed."""
    command = [sys.executable, __file__, "--arm", arm, *child_argv(args)]
    command += ([f"--shape={shape}"] if shape else []) + ([f"--folder={folder}"] if folder else [])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        killer = threading.Timer(timeout_s, process.kill) if timeout_s else None
        if killer:
            killer.start()
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        if killer:
            killer.cancel()
        wall_s = time.monotonic() - start
        code = os.waitstatus_to_exitcode(status)
        result_line = next((line[7:] for line in output.splitlines() if line.startswith("RESULT ")), None)
        if code != 0 or result_line is None:
            log.seek(0)
            tail = log.read().strip().splitlines()[-15:]
            reason = f"killed at the wall budget ({timeout_s:.0f} s)" if code == -9 and killer else f"exit code {code}"
            return {"error": reason, "stderr_tail": tail, "wall_s": wall_s}
    result = json.loads(result_line)
    result.update(peak_rss_gib=usage.ru_maxrss / 2**20, wall_s=wall_s)
    return result


def skip_reason(arm: str, cuda: bool) -> str | None:
    """Why an arm cannot run here, or None."""
    if arm.startswith("trl") and importlib.util.find_spec("trl") is None:
        return "trl is not installed (pip install 'trl>=1.16,<2', the project's bench extra)"
    if arm == "trl_liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install liger-kernel)"
    if arm == "trl_liger" and not cuda:
        return "Liger's kernels are Triton GPU kernels; no CUDA device here"
    if arm == "llmtune_qlora" and importlib.util.find_spec("bitsandbytes") is None:
        # on a CPU it still runs (bitsandbytes' CPU 4-bit path, torch AdamW): the smoke run checks the arm itself
        return "bitsandbytes is not installed (pip install bitsandbytes)"
    return None


def plan(args) -> list[tuple[str, str]]:
    """(shape, arm) pairs in run order: the target arms of every shape first, then TRL's speed options."""
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in (*CORE_ARMS, *EXTRA_ARMS)]
    if unknown:
        raise SystemExit(f"gpu.py: error: unknown arm(s) {', '.join(unknown)}; choose from "
                         f"{','.join((*CORE_ARMS, *EXTRA_ARMS))}")
    names = args.shapes.split(",")
    if any(name not in FULL_SHAPES for name in names):
        raise SystemExit(f"gpu.py: error: unknown shape in --shapes {args.shapes}; choose from {','.join(FULL_SHAPES)}")
    ordered = [a for a in (*CORE_ARMS, *EXTRA_ARMS) if a in arms]
    return [(s, a) for a in ordered if a in CORE_ARMS for s in names] + [
        (s, a) for s in names for a in ordered if a not in CORE_ARMS]


class Budget:
    """The run's wall budget (0: none). An arm starts only with at least min_s left, and is killed when it runs out."""

    def __init__(self, seconds: float, min_s: float):
        self.seconds, self.min_s, self.start = seconds, min_s, time.monotonic()

    def left(self) -> float | None:
        return None if not self.seconds else self.seconds - (time.monotonic() - self.start)

    def exhausted(self) -> bool:
        left = self.left()
        return left is not None and left < self.min_s


def log(message: str) -> None:
    print(f"[gpu] {message}", file=sys.stderr, flush=True)


def run_all(args, cuda: bool) -> tuple[dict, dict]:
    """The setup process (the models, and the CPU's peak), then each arm of the plan. Returns (results by
    "shape/arm", the setup's result)."""
    budget = Budget(args.budget_s, min_s=30.0 if not args.smoke else 0.0)
    reasons = {(shape, arm): skip_reason(arm, cuda) for shape, arm in plan(args)}
    needed = [s for s in args.shapes.split(",") if any(r is None for (shape, _), r in reasons.items() if shape == s)]
    work = Path(tempfile.mkdtemp(prefix="gpu_bench_", dir=args.model_cache))
    results, setup = {}, {"models": {}}
    try:
        if needed:
            log(f"building {', '.join(needed)} with random weights ...")
            setup = run_arm("setup", SimpleNamespace(**{**vars(args), "shapes": ",".join(needed)}), folder=str(work),
                            timeout_s=budget.left())
            log("setup: " + (describe(setup) if "error" in setup else ", ".join(
                f"{name} {m['params_total'] / 1e9:.3g}B parameters" for name, m in setup["models"].items())
                + f" in {setup['wall_s']:.0f} s"))
        for (shape, arm), reason in reasons.items():
            key = f"{shape}/{arm}"
            if reason is None and "error" in setup:
                reason = f"the models could not be built ({setup['error']})"
            if reason is None and budget.exhausted():
                reason = f"the wall budget (--budget-s {args.budget_s:.0f}) was spent before this arm"
            if reason is not None:
                results[key] = {"skipped": reason}
                log(f"{key}: skipped: {reason}")
                continue
            log(f"{key} ...")
            results[key] = run_arm(arm, args, shape, str(work / shape), budget.left())
            log(f"{key}: " + describe(results[key]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results, setup


def describe(result: dict) -> str:
    if "error" in result:
        return f"FAILED ({result['error']})\n    " + "\n    ".join(result["stderr_tail"])
    return ", ".join(f"{k}={v:.3g}" for k, v in result.items() if isinstance(v, float))


# ---------------------------------------------------------------------------------------------------- report
def peak_tflops(args, cuda: bool, setup: dict) -> tuple[float | None, str]:
    """(bf16 peak TFLOP/s, where it comes from): --peak-tflops, else the GPU table, else the CPU's measured bf16
    matmul throughput (speed.py's matmul arm, run by the setup process)."""
    device = setup.get("device")
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if cuda:
        found = data_sheet_peak(device)
        return (found, f"bf16 dense data-sheet peak of the {device}") if found else (
            None, f"{device or 'this GPU'} is not in the peak table; pass --peak-tflops")
    if setup.get("matmul"):
        return setup["matmul"]["bf16_tflops"], "measured: the best of 20 bf16 matmuls of 2048^3 on this CPU"
    return None, "not measured (the setup process did not run)"


def data_sheet_peak(device: str | None) -> float | None:
    return next((value for name, value in PEAK_BF16_TFLOPS if device and name in device), None)


def add_mfu(results: dict, models: dict, peak: float | None) -> None:
    for key, result in results.items():
        shape = key.split("/")[0]
        if "tokens_per_s" in result and shape in models:
            flops = result["tokens_per_s"] * 4 * models[shape]["params_blocks"]
            result["model_tflops"] = flops / 1e12
            result["mfu"] = flops / 1e12 / peak if peak else None


def peak_memory_gib(result: dict) -> float | None:
    """The arm's peak memory: GPU memory allocated by torch on CUDA, else the process's peak RSS."""
    return result.get("peak_gpu_allocated_gib", result.get("peak_rss_gib"))


def ratio_to_trl_default(results: dict, key: str) -> float | None:
    baseline = results.get(key.split("/")[0] + "/trl_default", {})
    if "tokens_per_s" in results[key] and "tokens_per_s" in baseline:
        return results[key]["tokens_per_s"] / baseline["tokens_per_s"]
    return None


def table_order(item: tuple[str, dict]) -> tuple[int, int]:
    """Rows grouped by shape, arms in their listed order (the run order puts the target arms of every shape first)."""
    shape, arm = item[0].split("/")
    return list(FULL_SHAPES).index(shape), (*CORE_ARMS, *EXTRA_ARMS).index(arm)


def results_table(results: dict, memory_kind: str) -> list[str]:
    lines = [f"| shape | arm | tokens/s | s/step | tokens/step | MFU | peak {memory_kind} GiB | ÷ trl_default | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in sorted(results.items(), key=table_order):
        shape, arm = key.split("/")
        if "tokens_per_s" not in r:
            note = r.get("skipped") and f"skipped: {r['skipped']}" or f"failed: {r.get('error')}"
            lines.append(f"| {shape} | {arm} | - | - | - | - | - | - | {note} |")
            continue
        mfu = f"{100 * r['mfu']:.2f}%" if r.get("mfu") is not None else "n/a"
        ratio = ratio_to_trl_default(results, key)
        loss = r["losses"][-1] if r.get("losses") else float("nan")
        lines.append(f"| {shape} | {arm} | {r['tokens_per_s']:,.0f} | {r['s_per_step']:.3f} | "
                     f"{r['tokens_per_step']:,.0f} | {mfu} | {peak_memory_gib(r):.2f} | "
                     f"{f'{ratio:.2f}x' if ratio else '-'} | last loss {loss:.2f} |")
    return lines


def targets(results: dict, judged: bool) -> list[dict]:
    """Issue 17's targets, each with its measured value and, on a GPU run of the full shapes, pass or fail."""
    rows = []

    def add(name, value, text, passed):
        rows.append({"target": name, "measured": value, "text": text,
                     "verdict": ("pass" if passed else "fail") if judged and value is not None
                     else "not judged (smoke run)" if not judged else "not measured"})

    for shape in sorted({key.split("/")[0] for key in results}):
        ratio = ratio_to_trl_default(results, f"{shape}/llmtune_lora") if f"{shape}/llmtune_lora" in results else None
        add(f"{shape}: llmtune LoRA ≥ 1.5x TRL defaults tokens/s", ratio, f"{ratio:.2f}x" if ratio else "-",
            ratio is not None and ratio >= 1.5)
    mfu = results.get("llama3_8b/llmtune_lora", {}).get("mfu")
    add("llama3_8b: llmtune LoRA MFU ≥ 40%", mfu, f"{100 * mfu:.2f}%" if mfu is not None else "-",
        mfu is not None and mfu >= 0.40)
    qlora = results.get("llama3_8b/llmtune_qlora", {})
    memory = qlora.get("peak_gpu_allocated_gib")
    add("llama3_8b: llmtune QLoRA peak GPU memory ≤ 12 GiB at batch 8 x 512", memory,
        f"{memory:.2f} GiB" if memory is not None else "-", memory is not None and memory <= 12)
    return rows


def report(args, results: dict, cuda: bool, device: str, peak: float | None, peak_source: str
           ) -> tuple[str, list[dict]]:
    memory_kind = "GPU (max allocated)" if cuda else "RSS"
    shape_text = "; ".join(f"{name}: {asdict(shape)}" for name, shape in shapes(args).items()
                           if name in args.shapes.split(","))
    judged = cuda and not args.smoke
    target_rows = targets(results, judged)
    lines = [f"Device: {device}. Peak: {f'{peak:.3g} TFLOP/s' if peak else 'unknown'} ({peak_source}).",
             f"{'Smoke shapes (CPU check, not the real models)' if args.smoke else 'Shapes'}: {shape_text}.",
             (f"Rows: batch {args.batch_size}, each row {args.min_len}-{args.seq_len - 1} tokens (uniform; a shared "
              f"{args.instruction_tokens}-token instruction, random words, a {args.answer_tokens}-token answer; loss "
              f"on the answer), bf16 base, LoRA r={LORA['r']} alpha={LORA['lora_alpha']} on all linear layers; "
              f"{args.steps} steps, the first {args.warmup} not timed."), "",
             *results_table(results, memory_kind), "",
             "| target | measured | pass/fail |", "|---|---|---|",
             *[f"| {row['target']} | {row['text']} | {row['verdict']} |" for row in target_rows], "",
             MFU_FORMULA, "", "Settings of each arm (as the arm reported them):",
             *[f"- {arm}: {setting}" for arm, setting in arm_settings(results).items()]]
    return "\n".join(lines), target_rows


def arm_settings(results: dict) -> dict[str, str]:
    """Each arm's own description of what it ran, once per arm (the shapes share it)."""
    settings = {}
    for key, result in sorted(results.items(), key=table_order):
        if result.get("setting"):
            settings.setdefault(key.split("/")[1], result["setting"])
    return settings


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: runs on a CPU")
    parser.add_argument("--arms", default=",".join((*CORE_ARMS, *EXTRA_ARMS)),
                        help="comma-separated subset (default: all: %(default)s)")
    for option in PROFILES["full"]:
        parser.add_argument(f"--{option.replace('_', '-')}", type=type(PROFILES["full"][option]),
                            help=f"default {PROFILES['full'][option]} (--smoke: {PROFILES['smoke'][option]})"
                            + ("; 0: no budget" if option == "budget_s" else ""))
    parser.add_argument("--peak-tflops", type=float, help="the device's bf16 peak for MFU (default: the GPU table, or "
                        "the CPU's measured bf16 matmul peak)")
    parser.add_argument("--llmtune-override", action="append", default=[],
                        help="a Hydra override for the llmtune arms, e.g. trainer.precision=bf16-mixed (repeatable)")
    parser.add_argument("--out", default=str(BENCHMARKS / "results"), help="folder for gpu.{json,md}")
    parser.add_argument("--model-cache", help="folder for the generated models (default: the system's temp folder); "
                        "they are deleted at the end")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option, default in PROFILES["smoke" if args.smoke else "full"].items():
        if getattr(args, option) is None:
            setattr(args, option, default)
    return args


def main():
    args = parse_args()
    if args.arm:
        print("RESULT " + json.dumps(ARMS[args.arm](args)), flush=True)
        return
    cuda = on_cuda()
    if not args.smoke and not cuda:
        print("gpu.py: error: the full Gemma-2B and Llama-3-8B shapes need a CUDA GPU and none is visible; "
              "run `python benchmarks/gpu.py --smoke` for the CPU check", file=sys.stderr)
        sys.exit(2)
    started = time.monotonic()
    results, setup = run_all(args, cuda)
    peak, peak_source = peak_tflops(args, cuda, setup)
    device = setup.get("device") or ("CUDA GPU" if cuda else "CPU")
    add_mfu(results, setup.get("models", {}), peak)
    text, target_rows = report(args, results, cuda, device, peak, peak_source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_smoke" if args.smoke else "gpu"
    recorded = {k: v for k, v in vars(args).items() if k not in ("arm", "shape", "folder", "out", "model_cache")}
    (out / f"{name}.json").write_text(json.dumps(
        {"args": recorded, "device": device, "peak_tflops": peak, "peak_source": peak_source,
         "mfu_formula": MFU_FORMULA, "wall_s": time.monotonic() - started, "setup": setup,
         "targets": target_rows, "arms": results}, indent=1))
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
    log(f"wrote {out / name}.json and .md in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
