"""Side by side, in one invocation: training tokens/s of TRL vs llmtune, and classification sentences/s of
generate-and-parse vs llmtune's label scoring, against the machine's measured bf16 matmul throughput.

    python benchmarks/speed.py                       # Financial PhraseBank from ../shared/data, Gemma 3 270M
    python benchmarks/speed.py --data FILE.csv --steps 12 --sentences 300
    python benchmarks/speed.py --adapter outputs/<run>/adapter     # inference arms on a tuned model

Every arm runs in its own fresh process (os.wait4 gives that process's own peak RSS); the parent prints a table and
writes benchmarks/results/speed.{json,md}. The llmtune arms call the product's own code (encode_rows, make_loaders,
FineTuner, make_trainer, label_log_likelihoods), not a loop written for the benchmark.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "financial_phrasebank" / "data.csv"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
WARMUP_STEPS = 2  # first steps pay one-off costs (allocator growth, lazy init); the TRL arms skip the same number


# ---------------------------------------------------------------------------------------------------- shared inputs
def product_config(args, overrides=()):
    sys.path.insert(0, str(REPO / "src"))
    from hydra import compose, initialize_config_dir

    from llmtune.config import CONFIG_DIR, register_resolvers

    register_resolvers()
    data = ["dataset=financial_phrasebank", f"dataset.path={args.data}"] if args.data else []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # an arm's overrides come last and win
        return compose(config_name="train",
                       overrides=[*data, f"trainer.batch_size={args.batch_size}", *overrides])


def inputs(args, overrides=()):
    """Config, model folder, train rows (steps x batch) and test rows, split by the product's seeded protocol."""
    from llmtune.tasks import task_of
    from llmtune.models.loader import prepare_model_dir

    cfg = product_config(args, overrides)
    splits = task_of(cfg).load_splits(cfg.seed)
    model_dir = prepare_model_dir(cfg.model, cfg.paths.cache_dir)
    return cfg, model_dir, splits["train"][: args.steps * args.batch_size], splits["test"][: args.sentences]


def non_embedding_params(model) -> int:
    """The frozen base's parameters that do matmul work per token (N in the FLOP counts): all but the embedding
    table and any LoRA matrices."""
    base = sum(p.numel() for name, p in model.named_parameters() if "lora_" not in name)
    return base - model.get_input_embeddings().weight.numel()


def prompts_and_answers(cfg, rows):
    from llmtune.data.prompts import PromptFormat

    fmt = PromptFormat.from_config(cfg.model, cfg.dataset)
    return [fmt.prompt(r["text"]) for r in rows], [fmt.answer(r["label"]) for r in rows], fmt


# ---------------------------------------------------------------------------------------------------- arms
def arm_matmul(args):
    """bf16 and fp32 matmul throughput, the machine's practical ceiling: the best of 20 runs of 2048^3 (the cores are
    shared, and a median once landed in a slow patch: 0.29 bf16 TFLOPS against 0.39-0.40 in the runs before)."""
    import torch

    result = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(20):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        result[f"{name}_tflops"] = 2 * 2048**3 / min(times) / 1e12
        result[f"{name}_tflops_median"] = 2 * 2048**3 / statistics.median(times) / 1e12
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    result["cpu"] = f"{model or 'unknown CPU'}, {os.cpu_count()} cores, " + (
        "AMX" if "amx_bf16" in cpuinfo else "AVX-512 BF16" if "avx512_bf16" in cpuinfo else "no bf16 units")
    return result


def arm_trl(args, compact):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from trl_arms import train_trl

    cfg, model_dir, train_rows, _ = inputs(args)
    prompts, answers, _ = prompts_and_answers(cfg, train_rows)
    return train_trl(model_dir, prompts, answers, args.batch_size, args.steps, compact_logits=compact, lora=LORA)


def arm_llmtune_train(args, overrides=()):
    """The product's training path: bf16 frozen base, fp32 LoRA, length pools, labelled-position LM head, the
    shared instruction computed once per batch; with overrides, the same path for another method or setting."""
    import lightning as L
    import torch
    from omegaconf import OmegaConf

    from llmtune.data.prompts import batch_tokens
    from llmtune.models.loader import load_base_model
    from llmtune.models.lora import add_lora
    from llmtune.training.setup import encode_rows, make_loaders

    cfg, model_dir, train_rows, _ = inputs(args, overrides)
    L.seed_everything(0, verbose=False)
    tokenizer, base = load_base_model(model_dir, cfg.model)
    model = add_lora(base, cfg.model, OmegaConf.create({**OmegaConf.to_container(cfg.method), "lora": LORA}))
    _, _, fmt = prompts_and_answers(cfg, train_rows)
    train_loader, _ = make_loaders(encode_rows(train_rows, tokenizer, fmt, cfg.method.loss_on), [], cfg.trainer,
                                   tokenizer.pad_token_id, seed=0)

    class StepTimer(L.Callback):
        seconds, tokens, computed, losses = [], [], [], []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.seconds.append(time.perf_counter() - self.start)
            self.tokens.append(batch_tokens(batch))
            # positions the hardware ran: every padded position, the shared prefix once per batch
            self.computed.append(batch["input_ids"].numel() + len(batch.get("prefix_ids", ())))
            self.losses.append(float(outputs["loss"]))

    timer = StepTimer()
    fit_steps(cfg, model, train_loader, timer, args.steps)
    timed_s, timed_tok = timer.seconds[WARMUP_STEPS:], timer.tokens[WARMUP_STEPS:]
    return {"tokens_per_s": sum(timed_tok) / sum(timed_s), "s_per_step": statistics.median(timed_s),
            "steps": len(timer.seconds), "tokens": sum(timed_tok), "losses": timer.losses,
            "computed_positions_per_s": sum(timer.computed[WARMUP_STEPS:]) / sum(timed_s),
            "sequences_per_step": train_loader.batch_sampler.batch_size, "overrides": list(overrides),
            "non_embedding_params": non_embedding_params(model), "threads": torch.get_num_threads(),
            "setting": "llmtune FineTuner + Lightning Trainer as `python -m llmtune` builds them"}


def fit_steps(cfg, model, train_loader, timer, steps: int) -> None:
    """`steps` optimizer steps of the product's FineTuner and Trainer (no checkpoints, no logger), timed by `timer`."""
    from hydra.utils import instantiate

    from llmtune.training.module import FineTuner
    from llmtune.training.setup import make_trainer

    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(cfg.trainer, Path(run_dir), logger=False, callbacks=[timer], max_steps=steps,
                               max_epochs=-1, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(FineTuner(model, optimizer=instantiate(cfg.method.optimizer),
                              scheduler=instantiate(cfg.method.scheduler)), train_loader)


def arm_generate(args):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from trl_arms import generate_and_parse

    cfg, model_dir, _, test_rows = inputs(args)
    prompts, _, _ = prompts_and_answers(cfg, test_rows)
    return generate_and_parse(model_dir, prompts, list(cfg.dataset.labels), batch_size=args.eval_batch_size,
                              adapter_dir=args.adapter)


def arm_llmtune_score(args, quantize=False):
    from llmtune.data.prompts import shared_prefix_length
    from llmtune.evaluation.scoring import label_log_likelihoods
    from llmtune.models.loader import load_base_model

    cfg, model_dir, _, test_rows = inputs(args)
    prompts, _, fmt = prompts_and_answers(cfg, test_rows)
    tokenizer, model = load_base_model(model_dir, cfg.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    params = non_embedding_params(model)  # before int8: its layers hold their weights as buffers, not parameters
    if quantize:
        from llmtune.models.int8 import quantize_linears_int8

        model = quantize_linears_int8(model)  # merges an adapter first
    labels = list(cfg.dataset.labels)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    # positions each sentence runs through the model: its tokens after the shared instruction, plus the label's
    prefix = shared_prefix_length(prompt_ids)
    positions = sum(len(ids) - prefix + 1 for ids in prompt_ids) / len(prompts)
    label_log_likelihoods(model, tokenizer, prompts[:4], [fmt.answer(x) for x in labels], 4)  # warm-up, untimed
    start = time.perf_counter()
    scores = label_log_likelihoods(model, tokenizer, prompts, [fmt.answer(x) for x in labels], args.eval_batch_size)
    seconds = time.perf_counter() - start
    return {"sentences_per_s": len(prompts) / seconds, "seconds": seconds, "positions_per_sentence": positions,
            "non_embedding_params": params,
            "predictions": [labels[i] for i in scores.argmax(1).tolist()]}


def arm_generation(args, fixed=True):
    """Greedy generation tokens/s of the bare base, the base with an unmerged LoRA adapter, and merged, side by side
    in one process (--adapter, else a fresh adapter: the same work); fixed=False leaves out llmtune's fix of torch's
    unfolded LM-head matmul (the "before" figure)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from trl_arms import base_vs_adapter_generation

    cfg, model_dir, _, test_rows = inputs(args)
    prompts, _, _ = prompts_and_answers(cfg, test_rows)
    adapter = args.adapter
    if adapter is None:
        from omegaconf import OmegaConf

        from llmtune.models.loader import load_base_model
        from llmtune.models.lora import add_lora

        adapter = tempfile.mkdtemp(prefix="adapter-")
        _, model = load_base_model(model_dir, cfg.model)
        add_lora(model, cfg.model, OmegaConf.create({**OmegaConf.to_container(cfg.method), "lora": LORA})
                 ).save_pretrained(adapter)
    result = base_vs_adapter_generation(model_dir, adapter, prompts[:48], batch_size=args.eval_batch_size,
                                        rounds=1, contiguous_head_input=fixed)
    return {key: value for key, value in result.items() if key != "generations"}


# The 9-class Japanese news-title set's labels (livedoor news corpus), several tokens each
NEWS_LABELS = ["dokujo-tsushin", "it-life-hack", "kaden-channel", "livedoor-homme", "movie-enter", "peachy", "smax",
               "sports-watch", "topic-news"]


def news_inputs(args):
    """Prompts of the shipped Japanese news set (test split, then train rows, up to --sentences) and the answers of
    the nine multi-token labels above: the speed of scoring depends on the labels' tokens, not on what they mean."""
    from llmtune.tasks import task_of

    cfg = product_config(argparse.Namespace(data=None, batch_size=args.batch_size), ["dataset=news_topics_ja"])
    splits = task_of(cfg).load_splits(cfg.seed)
    rows = (splits["test"] + splits["train"])[: args.sentences]
    prompts, _, fmt = prompts_and_answers(cfg, rows)
    return cfg, prompts, [fmt.answer(label) for label in NEWS_LABELS]


def score_label_by_label(model, tokenizer, prompts, answers, batch_size):
    """Multi-token label scoring as llmtune did it before one-pass scoring: the shared instruction once, then every
    prompt run again for every label, with the label's tokens appended (product parts, the old loop)."""
    import copy

    import torch

    from llmtune.data.prompts import IGNORE_INDEX, pad_batch, shared_prefix_length
    from llmtune.evaluation.batches import length_sorted_batches
    from llmtune.models.logits import labelled_logits, prefix_cache

    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    prefix = shared_prefix_length(prompt_ids)
    rests = [ids[prefix:] for ids in prompt_ids]
    scores = torch.zeros((len(prompts), len(answers)))
    with torch.no_grad():
        cache = prefix_cache(model.eval(), torch.tensor(prompt_ids[0][:prefix]))
        for rows in length_sorted_batches([len(r) for r in rests], batch_size, "label by label"):
            for j, ids in enumerate(answer_ids):
                batch = pad_batch([{"input_ids": rests[i] + ids, "labels": [IGNORE_INDEX] * len(rests[i]) + ids}
                                   for i in rows], tokenizer.pad_token_id)
                logits, targets, row_of = labelled_logits(model, batch, copy.deepcopy(cache))
                picked = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
                scores[rows, j] = torch.zeros(len(rows)).index_add_(0, row_of, picked)
    return scores


def arm_multitoken(args, one_pass):
    """Nine multi-token labels scored by the product (one pass over each prompt) or label by label (the old way)."""
    from llmtune.data.prompts import shared_prefix_length
    from llmtune.evaluation.scoring import AnswerBranches, label_log_likelihoods
    from llmtune.models.loader import load_base_model
    from llmtune.models.loader import prepare_model_dir

    cfg, prompts, answers = news_inputs(args)
    tokenizer, model = load_base_model(prepare_model_dir(cfg.model, cfg.paths.cache_dir), cfg.model)
    score = label_log_likelihoods if one_pass else score_label_by_label
    score(model, tokenizer, prompts[:4], answers, 4)  # warm-up, untimed
    start = time.perf_counter()
    scores = score(model, tokenizer, prompts, answers, args.eval_batch_size)
    seconds = time.perf_counter() - start
    # Positions run through the decoder per sentence (the shared instruction is once per batch: left out) and those
    # whose logits are normalised over the whole vocabulary (the LM head's work)
    prompt_ids = [tokenizer(p).input_ids for p in prompts]
    rest = sum(len(ids) for ids in prompt_ids) / len(prompts) - shared_prefix_length(prompt_ids)
    answer_ids = [tokenizer(a, add_special_tokens=False).input_ids for a in answers]
    if one_pass:
        branches = AnswerBranches(answer_ids)
        positions, head_positions = rest + len(branches.branches) * branches.width, 1 + len(branches.targets)
    else:
        positions = sum(rest + len(ids) for ids in answer_ids)
        head_positions = sum(len(ids) for ids in answer_ids)
    return {"sentences_per_s": len(prompts) / seconds, "seconds": seconds, "positions_per_sentence": positions,
            "head_positions_per_sentence": head_positions, "label_tokens": [len(ids) for ids in answer_ids],
            "non_embedding_params": non_embedding_params(model), "head_params": model.get_output_embeddings().weight.numel(),
            "scores": scores.tolist()}


def arm_adapter_score(args, merged):
    """FPB label scoring through a LoRA adapter (--adapter, else a fresh one: the same work), unmerged or folded into
    the weights as predict, serve and the scoring after training now do."""
    from llmtune.evaluation.scoring import label_log_likelihoods
    from llmtune.models.loader import load_base_model
    from llmtune.models.merging import merged_for_inference

    cfg, model_dir, _, test_rows = inputs(args)
    prompts, _, fmt = prompts_and_answers(cfg, test_rows)
    tokenizer, model = load_base_model(model_dir, cfg.model)
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter)
    else:
        from omegaconf import OmegaConf

        from llmtune.models.lora import add_lora

        model = add_lora(model, cfg.model, OmegaConf.create({**OmegaConf.to_container(cfg.method), "lora": LORA}))
    if merged:
        model = merged_for_inference(model)
    answers, labels = [fmt.answer(x) for x in cfg.dataset.labels], list(cfg.dataset.labels)
    label_log_likelihoods(model, tokenizer, prompts[:4], answers, 4)  # warm-up, untimed
    start = time.perf_counter()
    scores = label_log_likelihoods(model, tokenizer, prompts, answers, args.eval_batch_size)
    seconds = time.perf_counter() - start
    return {"sentences_per_s": len(prompts) / seconds, "seconds": seconds,
            "predictions": [labels[i] for i in scores.argmax(1).tolist()]}


ARMS = {
    "matmul": arm_matmul,
    "trl_default": lambda args: arm_trl(args, compact=False),
    "trl_compact": lambda args: arm_trl(args, compact=True),
    "llmtune_train": arm_llmtune_train,
    # method=causal (loss on every token, so the LM head runs at every position) padded vs packed: 2 packs of
    # 320 tokens hold about as many tokens as 8 padded rows of ~80
    "llmtune_causal": lambda args: arm_llmtune_train(args, ["method=causal"]),
    "llmtune_causal_packed": lambda args: arm_llmtune_train(
        args, ["method=causal", "trainer.packing=320", f"trainer.batch_size={max(1, args.batch_size // 4)}"]),
    "generate_parse": arm_generate,
    "llmtune_score": arm_llmtune_score,
    "multitoken_label_by_label": lambda args: arm_multitoken(args, one_pass=False),
    "multitoken_one_pass": lambda args: arm_multitoken(args, one_pass=True),
    "adapter_unmerged": lambda args: arm_adapter_score(args, merged=False),
    "adapter_merged": lambda args: arm_adapter_score(args, merged=True),
    "generation_before_fix": lambda args: arm_generation(args, fixed=False),
    "generation": arm_generation,
    "llmtune_score_int8": lambda args: arm_llmtune_score(args, quantize=True),
}


# ---------------------------------------------------------------------------------------------------- orchestration
def run_arm(name, argv):
    """Run one arm in a fresh interpreter; its own peak RSS comes from wait4's rusage (KiB on Linux)."""
    process = subprocess.Popen([sys.executable, __file__, "--arm", name, *argv], stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        return {"error": f"exit code {process.returncode}"}
    result = json.loads(next(line[7:] for line in output.splitlines() if line.startswith("RESULT ")))
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20
    return result


def report(results, args):
    """Markdown tables and a summary for whichever groups of arms ran (training, inference, matmul)."""
    lines, summary = [], {}
    training = ("trl_default", "trl_compact", "llmtune_train")
    if all(name in results for name in training):
        train = results["llmtune_train"]
        lines += ["| training | tokens/s | s/step | peak RSS GiB | llmtune ÷ this |", "|---|---|---|---|---|"]
        for name in training:
            r = results[name]
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {r['peak_rss_gib']:.2f} | "
                         f"{train['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
            summary[f"train_ratio_vs_{name}"] = train["tokens_per_s"] / r["tokens_per_s"]
        lines.append("")
    if "llmtune_causal" in results and "llmtune_causal_packed" in results:
        padded, packed = results["llmtune_causal"], results["llmtune_causal_packed"]
        lines += ["| method=causal | tokens/s | s/step | sequences/step | peak RSS GiB | packed ÷ this |",
                  "|---|---|---|---|---|---|"]
        for name, r in (("padded rows", padded), ("packed (trainer.packing=320)", packed)):
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['s_per_step']:.2f} | {r['sequences_per_step']} | "
                         f"{r['peak_rss_gib']:.2f} | {packed['tokens_per_s'] / r['tokens_per_s']:.2f}x |")
        summary["causal_packed_vs_padded"] = packed["tokens_per_s"] / padded["tokens_per_s"]
        lines.append("")
    if "generate_parse" in results and "llmtune_score" in results:
        generate, score = results["generate_parse"], results["llmtune_score"]
        lines += ["| inference | sentences/s | seconds | peak RSS GiB | llmtune ÷ this |", "|---|---|---|---|---|"]
        for name in ("generate_parse", "llmtune_score"):
            r = results[name]
            lines.append(f"| {name} | {r['sentences_per_s']:.1f} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} | "
                         f"{score['sentences_per_s'] / r['sentences_per_s']:.2f}x |")
        summary["inference_ratio_vs_generate"] = score["sentences_per_s"] / generate["sentences_per_s"]
        summary["label_agreement_generate_vs_scoring"] = (
            sum(a == b for a, b in zip(generate["predictions"], score["predictions"])) / len(score["predictions"]))
        summary["generate_unparseable"] = generate["unparseable"]
        lines += ["", f"generate-vs-scoring label agreement {100 * summary['label_agreement_generate_vs_scoring']:.1f}%"
                  f" ({generate['unparseable']} unparseable generations) on {len(score['predictions'])} test "
                  f"sentences, adapter: {args.adapter or 'none (base model)'}."]
    lines += inference_speed_tables(results, summary)
    if "matmul" in results:
        peak = results["matmul"]["bf16_tflops"]
        summary.update(bf16_matmul_tflops=peak, fp32_matmul_tflops=results["matmul"]["fp32_tflops"])
        lines.append(f"{results['matmul']['cpu']}: bf16 matmul {peak:.2f} TFLOPS (fp32 "
                     f"{results['matmul']['fp32_tflops']:.2f}).")
        if "llmtune_train" in results:
            # LoRA on a frozen base: forward 2N FLOPs/token, backward 2N for the input gradients (no weight
            # gradients for frozen N); the LoRA matrices (~1% of N) and the answer-position LM head are left out.
            # Model FLOPs count every trained token, each row's copy of the shared instruction included (the work a
            # plain implementation does); hardware FLOPs count the positions actually run (the prefix once per
            # batch, padding included).
            train = results["llmtune_train"]
            per_token = 4 * train["non_embedding_params"]
            summary["llmtune_train_tflops"] = train["tokens_per_s"] * per_token / 1e12
            summary["llmtune_train_utilisation"] = summary["llmtune_train_tflops"] / peak
            summary["llmtune_train_hardware_tflops"] = train["computed_positions_per_s"] * per_token / 1e12
            summary["llmtune_train_hardware_utilisation"] = summary["llmtune_train_hardware_tflops"] / peak
            lines.append(f"llmtune training {summary['llmtune_train_tflops']:.3f} TFLOPS of model FLOPs = "
                         f"{100 * summary['llmtune_train_utilisation']:.0f}% of the bf16 peak (hardware FLOPs, the "
                         f"shared prefix once per batch: {summary['llmtune_train_hardware_tflops']:.3f} TFLOPS = "
                         f"{100 * summary['llmtune_train_hardware_utilisation']:.0f}%); batch {args.batch_size}, "
                         f"{args.steps} steps ({WARMUP_STEPS} warm-up), {train['threads']} threads.")
        for name in ("multitoken_label_by_label", "multitoken_one_pass"):
            if name in results:  # decoder positions at 2N FLOPs, plus the vocabulary-wide LM head where it runs
                r = results[name]
                flops = 2 * (r["non_embedding_params"] * r["positions_per_sentence"]
                             + r["head_params"] * r["head_positions_per_sentence"])
                summary[f"{name}_utilisation"] = r["sentences_per_s"] * flops / 1e12 / peak
                lines.append(f"{name}: {r['sentences_per_s']:.2f} sentences/s x {flops / 1e9:.1f} GFLOP "
                             f"({r['positions_per_sentence']:.0f} decoder and {r['head_positions_per_sentence']} "
                             f"LM-head positions) = {100 * summary[f'{name}_utilisation']:.0f}% of the bf16 peak.")
        if "llmtune_score" in results:
            # Scoring is a forward pass: 2N FLOPs per position; the label-rows-only LM head is left out.
            score = results["llmtune_score"]
            per_sentence = 2 * score["non_embedding_params"] * score["positions_per_sentence"]
            summary["llmtune_score_utilisation"] = score["sentences_per_s"] * per_sentence / 1e12 / peak
            summary["sentences_per_s_at_the_bf16_peak"] = peak * 1e12 / per_sentence
            lines.append(f"llmtune scoring {score['sentences_per_s']:.1f} sentences/s x "
                         f"{score['positions_per_sentence']:.1f} positions x 2 x "
                         f"{score['non_embedding_params'] / 1e6:.0f}M = "
                         f"{100 * summary['llmtune_score_utilisation']:.0f}% of the bf16 peak; at 100% it would "
                         f"score {summary['sentences_per_s_at_the_bf16_peak']:.0f} sentences/s.")
    return "\n".join(lines), summary


def inference_speed_tables(results, summary) -> list[str]:
    """Issue 20's arms, each pair side by side: multi-token labels, merged adapter, adapter generation, int8."""
    import torch

    lines = []
    pairs = [("multi-token labels (9 labels)", "multitoken_label_by_label", "multitoken_one_pass", "sentences_per_s"),
             ("scoring through an adapter", "adapter_unmerged", "adapter_merged", "sentences_per_s"),
             ("int8 scoring", "llmtune_score", "llmtune_score_int8", "sentences_per_s")]
    for title, old, new, unit in pairs:
        if old not in results or new not in results or "error" in results[old] or "error" in results[new]:
            continue
        a, b = results[old], results[new]
        ratio = b[unit] / a[unit]
        summary[f"{new}_vs_{old}"] = ratio
        lines += [f"| {title} | {unit.replace('_', ' ')} | seconds | peak RSS GiB |", "|---|---|---|---|"]
        lines += [f"| {name} | {r[unit]:.2f} | {r['seconds']:.1f} | {r['peak_rss_gib']:.2f} |"
                  for name, r in ((old, a), (new, b))]
        if "scores" in a:
            diff = (torch.tensor(a["scores"]) - torch.tensor(b["scores"])).abs().max().item()
            agree = (torch.tensor(a["scores"]).argmax(1) == torch.tensor(b["scores"]).argmax(1)).float().mean().item()
            summary[f"{new}_max_score_difference"], summary[f"{new}_label_agreement"] = diff, agree
            lines.append(f"\n{new} ÷ {old}: {ratio:.2f}x; largest score difference {diff:.3g} (bf16), labels "
                         f"agree on {100 * agree:.1f}% of {len(a['scores'])} sentences.")
        else:
            agree = sum(x == y for x, y in zip(a["predictions"], b["predictions"])) / len(a["predictions"])
            summary[f"{new}_label_agreement"] = agree
            lines.append(f"\n{new} ÷ {old}: {ratio:.2f}x; labels agree on {100 * agree:.1f}% of "
                         f"{len(a['predictions'])} sentences.")
        lines.append("")
    for name in ("generation_before_fix", "generation"):
        if name in results and "error" not in results[name]:
            r = results[name]
            summary[f"{name}_adapter_slowdown"] = r["adapter"]["tokens_per_s"] and (
                r["base"]["tokens_per_s"] / r["adapter"]["tokens_per_s"])
            lines += [f"| {name}: greedy generation | tokens/s | base ÷ this |", "|---|---|---|"]
            lines += [f"| {arm} | {r[arm]['tokens_per_s']:.1f} | {r['base']['tokens_per_s'] / r[arm]['tokens_per_s']:.2f}x |"
                      for arm in ("base", "adapter", "merged")]
            lines += [f"\n{r['setting']}; same texts every round: {r['deterministic']}.", ""]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA) if DEFAULT_DATA.is_file() else None,
                        help="Financial PhraseBank CSV (default: ../shared/data/...; else the shipped demo set)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--adapter", help="a run's adapter/ folder for both inference arms (the base model rarely "
                        "generates a label at all)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset (default: all)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "src"))

    if args.arm:
        print("RESULT " + json.dumps(ARMS[args.arm](args)), flush=True)
        return
    argv = [f"--steps={args.steps}", f"--batch-size={args.batch_size}", f"--eval-batch-size={args.eval_batch_size}",
            f"--sentences={args.sentences}"] + ([f"--data={args.data}"] if args.data else []) + (
        [f"--adapter={args.adapter}"] if args.adapter else [])
    results = {}
    for name in args.arms.split(","):
        print(f"[speed] {name} ...", file=sys.stderr, flush=True)
        results[name] = run_arm(name, argv)
        print(f"[speed] {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in results[name].items()
                                              if isinstance(v, float)), file=sys.stderr, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, summary = report(results, args)
    recorded = {k: os.path.relpath(v, REPO) if k in ("data", "out", "adapter") and v else v
                for k, v in vars(args).items()}
    (out / "speed.json").write_text(json.dumps({"args": recorded, "summary": summary, "arms": results}, indent=1))
    (out / "speed.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
