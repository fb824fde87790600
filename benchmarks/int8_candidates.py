"""int8 label scoring candidates against the bf16 model, side by side in one process: sentences/s and label agreement
with bf16, on Financial PhraseBank prompts as benchmarks/speed.py builds them. The record of why
llmtune.models.int8 is what it is.

    python benchmarks/int8_candidates.py                                    # 200 test sentences, base model
    python benchmarks/int8_candidates.py --adapter outputs/<run>/adapter --seed <the run's seed>   # a tuned model
    python benchmarks/int8_candidates.py --arms bf16,int8_mm --sentences 900 --repeats 1          # agreement only

Arms (each a full model, the decoder's nn.Linear layers replaced; embeddings and LM head untouched):
  bf16                 the reference: the model as load_base_model gives it (a tuned model merged, as predict runs it)
  int8_mm              llmtune.models.int8: torch._int_mm (oneDNN), int8 weights per channel, activations per token
  int8_mm_bf16_down    the same with every down_proj left in bf16 (its input, after the gated activation, has the
                       spikiest tokens: max/RMS ~25-35 against ~10-20 for the other projections' inputs)
  ao_dynamic           torch.ao.quantization.quantize_dynamic, qint8 Linear on the x86 engine (fbgemm/oneDNN), fp32 in
                       and out, so each layer casts bf16 -> fp32 -> bf16; per-tensor activation scale; deprecated in
                       torch 2.13 (its warning points to torchao)
  torchao_dynamic      torchao quantize_(Int8DynamicActivationInt8WeightConfig()), eager (no torch.compile)
  torchao_weight_only  torchao quantize_(Int8WeightOnlyConfig()), eager
The torchao arms run when `torchao` imports (pip install torchao); they are skipped with a note otherwise.

Timing: the machine is shared, so every arm scores the same length-sorted batch one after another, alternating the
order, `--repeats` times; each arm's time is the sum over batches of its best time per batch. Every batch scores the
shared instruction again (label_log_likelihoods per batch), the same extra work for every arm.

Measured 2026-12-03 on a 2-core AMD EPYC (AVX-512 VNNI and BF16, no AMX) shared with other jobs, torch 2.13.0+cpu,
torchao 0.18.0; base model, the 200 default test sentences, best of 3 per batch, 2 threads:

    | arm                 | sentences/s | x bf16 | agreement with bf16 |
    | bf16                |        15.6 |   1.00 | 1.0000 (200/200)    |
    | int8_mm             |        18.1 |   1.17 | 0.9500 (190/200)    |
    | int8_mm_bf16_down   |        16.9 |   1.08 | 0.9700 (194/200)    |
    | ao_dynamic          |        17.4 |   1.12 | 0.9150 (183/200)    |
    | torchao_dynamic     |         9.8 |   0.63 | 0.9600 (192/200)    |
    | torchao_weight_only |        12.5 |   0.80 | 0.9750 (195/200)    |

Other runs, the same way: `--threads 1` bf16 27.1, int8_mm 33.7 (1.24x), int8_mm_bf16_down 1.16x, ao_dynamic 1.27x;
a quieter spell, tuned (the fpb seed-2 adapter, its own 900 test sentences, best of 1): bf16 40.0, int8_mm 46.4
(1.16x, agreement 0.9800), int8_mm_bf16_down 1.12x (0.9878); base, 900 sentences: int8_mm agreement 0.9600. Under
heavy load the ratio fell to 0.89-0.97x: the int8 path's many small eager ops suffer most when threads are descheduled.
Bounds from prototype quantisers on the same 900 tuned sentences: fp32 vs bf16 0.9978; int8 weights alone, activations
unquantised, 0.9922; SmoothQuant (alpha 0.5, 64 calibration prompts) with down_proj in bf16, 0.9922.

Chosen: int8_mm, the fastest of those that use torch's maintained int8 path (torch.ao's dynamic Linear is as fast at
one thread but 91.5% agreement, 7-bit per-tensor activations, and deprecated; torchao's eager int8 runs slower than
bf16 here, its CPU speed comes with torch.compile). No candidate reaches 99.5% agreement on this model.
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("LLMTUNE_PROGRESS_EVERY_S", "100000")  # no progress lines per batch

from speed import DEFAULT_DATA, inputs, prompts_and_answers

ARMS = ["bf16", "int8_mm", "int8_mm_bf16_down", "ao_dynamic", "torchao_dynamic", "torchao_weight_only"]


def decoder_linears(model):
    """(parent, attribute name, nn.Linear) for every plain nn.Linear inside the decoder."""
    from torch import nn

    return [(parent, name, child) for parent in list(model.get_decoder().modules())
            for name, child in list(parent.named_children()) if type(child) is nn.Linear]


def ao_dynamic(model):
    import torch
    from torch import nn

    class AoDynamicLinear(nn.Module):
        """torch.ao's dynamic qint8 Linear takes fp32 only: cast in and out."""

        def __init__(self, linear):
            super().__init__()
            self.quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(linear.float()), {nn.Linear},
                                                                    dtype=torch.qint8)[0]

        def forward(self, x):
            return self.quantized(x.float()).to(x.dtype)

    torch.backends.quantized.engine = "x86"
    for parent, name, linear in decoder_linears(model):
        setattr(parent, name, AoDynamicLinear(linear))
    return model


def torchao(model, weight_only: bool):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    inside = {id(linear) for _, _, linear in decoder_linears(model)}
    config = Int8WeightOnlyConfig() if weight_only else Int8DynamicActivationInt8WeightConfig()
    quantize_(model, config, filter_fn=lambda module, fqn: id(module) in inside)
    return model


def build(arm: str, model):
    from llmtune.models.int8 import quantize_linears_int8

    if arm == "int8_mm":
        return quantize_linears_int8(model)
    if arm == "int8_mm_bf16_down":
        keep = [(parent, name, linear) for parent, name, linear in decoder_linears(model) if name == "down_proj"]
        model = quantize_linears_int8(model)
        for parent, name, linear in keep:  # put the bf16 down_proj layers back
            setattr(parent, name, linear)
        return model
    if arm == "ao_dynamic":
        return ao_dynamic(model)
    if arm in ("torchao_dynamic", "torchao_weight_only"):
        return torchao(model, weight_only=arm == "torchao_weight_only")
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapter", help="a run's adapter/ folder: score the tuned model (merged) instead of the base")
    parser.add_argument("--seed", type=int, help="the split seed (a tuned run's own, so its test rows are unseen)")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from llmtune.evaluation.scoring import label_log_likelihoods
    from llmtune.models.loader import load_base_model

    setting = argparse.Namespace(data=args.data, batch_size=8, steps=0, sentences=args.sentences)
    cfg, model_dir, _, rows = inputs(setting, [f"seed={args.seed}"] if args.seed is not None else [])
    prompts, _, fmt = prompts_and_answers(cfg, rows)
    labels = list(cfg.dataset.labels)
    answers = [fmt.answer(label) for label in labels]

    def load():
        tokenizer, model = load_base_model(model_dir, cfg.model)
        if args.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
        return tokenizer, model.eval()

    arms, models, skipped = [], {}, {}
    for arm in args.arms.split(","):
        tokenizer, model = load()
        try:
            models[arm] = build(arm, model)
        except ImportError as error:
            skipped[arm] = f"skipped: {error}"
            continue
        arms.append(arm)

    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i]).input_ids))
    batches = [order[i:i + args.eval_batch_size] for i in range(0, len(order), args.eval_batch_size)]
    for arm in arms:  # warm-up, untimed: oneDNN primitive creation, allocator growth
        label_log_likelihoods(models[arm], tokenizer, [prompts[i] for i in batches[-1]], answers, args.eval_batch_size)
    scores = {arm: torch.zeros(len(prompts), len(labels)) for arm in arms}
    best = {arm: 0.0 for arm in arms}
    for b, batch in enumerate(batches):
        batch_prompts, times = [prompts[i] for i in batch], {arm: [] for arm in arms}
        for r in range(args.repeats):
            for arm in arms if (b + r) % 2 == 0 else arms[::-1]:
                start = time.perf_counter()
                scores[arm][batch] = label_log_likelihoods(models[arm], tokenizer, batch_prompts, answers,
                                                           args.eval_batch_size)
                times[arm].append(time.perf_counter() - start)
        for arm in arms:
            best[arm] += min(times[arm])

    reference = scores[arms[0]]
    print(f"{len(prompts)} sentences ({'tuned: ' + args.adapter if args.adapter else 'base model'}, seed {cfg.seed}), "
          f"batch {args.eval_batch_size}, best of {args.repeats} per batch, {torch.get_num_threads()} threads; "
          f"reference arm: {arms[0]}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"| arm | sentences/s | × {arms[0]} | agreement with {arms[0]} | mean abs Δp |")
    print("|---|---|---|---|---|")
    for arm in arms:
        agree = (scores[arm].argmax(1) == reference.argmax(1)).float().mean().item()
        delta = (scores[arm].softmax(1) - reference.softmax(1)).abs().mean().item()
        print(f"| {arm} | {len(prompts) / best[arm]:.1f} | {best[arms[0]] / best[arm]:.2f} | {agree:.4f} "
              f"({round(agree * len(prompts))}/{len(prompts)}) | {delta:.4f} |")
    for arm, why in skipped.items():
        print(f"| {arm} | {why} |")


if __name__ == "__main__":
    main()
