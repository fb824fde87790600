"""`llmtune export RUN_DIR format=merged|gguf|ollama [quant=f16|q8_0] ...`: ship a run, then prove the export.

    merged  -> RUN_DIR/export/merged/          sharded safetensors + tokenizer (plain transformers loads it; a
                                               method=classifier run: AutoModelForSequenceClassification)
    gguf    -> RUN_DIR/export/gguf/<run>-<quant>.gguf   (llama.cpp; tokenizer embedded)
    ollama  -> RUN_DIR/export/ollama/          the GGUF + a Modelfile (`ollama create NAME -f Modelfile`)

The target folder (out=DIR) must be new or empty; overwrite=true replaces an earlier export there, and never a folder
llmtune did not write (its marker file, .llmtune-output, says which).

After writing, the export re-predicts the run's test rows (GGUF through transformers' gguf_file= loader) and fails
below min_agreement with the run's predictions.jsonl (default 0.99; 0.97 for q8_0; Q&A runs: 0.8 mean ROUGE-L of
the answers against the run's own). A classification also reports the largest difference in any label's probability.
A method=classifier run (a classification head, not a language model) exports format=merged only.
"""

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from rich.console import Console

from llmtune.cli import option, parse, positional
from llmtune.errors import UserError
from llmtune.files import atomic_folder, check_output_folder

Format = Literal["merged", "gguf", "ollama"]
DEFAULT_QUANT = {"gguf": "f16", "ollama": "q8_0"}
MIN_AGREEMENT = {"q8_0": 0.97}  # everything else: 0.99; Q8_0 rounds each weight to 8 bits, a few flips are expected
# Q&A: mean ROUGE-L of the export's answers against the run's. A sound bf16 merge of the HR rag run repeated 83 of
# 100 answers word for word; the others drift after one flipped greedy token, so identity alone is too strict.
QA_MIN_AGREEMENT = 0.8


@dataclass(frozen=True)
class ExportArgs:
    """Ship a finished run as a merged model (plain transformers), a GGUF file (llama.cpp) or an Ollama model, then
    re-predict the run's test rows with the export and fail if they disagree with the run's own predictions."""

    run_dir: Path = positional("a finished run's folder (its name may hold '=', e.g. ...-rag=False)",
                               metavar="RUN_DIR")
    format: Format = option("merged", "merged: sharded safetensors + tokenizer; gguf: one .gguf file; ollama: the "
                                      "GGUF + a Modelfile")
    # Checked in main against the GGUF writer's types, which load only when a GGUF is written.
    quant: str | None = option(None, "the GGUF tensor type, for format=gguf or ollama", metavar="TYPE",
                               default_text="f16 for gguf, q8_0 for ollama")
    dtype: Literal["float32", "bfloat16", "float16"] | None = option(
        None, "the merged weights' dtype, for format=merged", default_text="the model's configured dtype")
    out: Path | None = option(None, "the target folder: new or empty, or an earlier export with overwrite=true",
                              metavar="DIR", default_text="RUN_DIR/export/FORMAT")
    max_shard_size: str = option("1GB", "the largest safetensors file, for format=merged", metavar="SIZE")
    min_agreement: float = option(0.0, "the least agreement with the run's predictions that passes", minimum=0,
                                  maximum=1, default_text="0, meaning 0.99; 0.97 for q8_0; 0.8 mean ROUGE-L for Q&A")
    check: bool = option(True, "re-predict the test rows with the export and compare")
    overwrite: bool = option(False, "replace an earlier export in out=DIR (never a folder llmtune did not write)")
    trust_remote_code: bool = option(False, "load a run whose config asks for remote code or names its own model.path")


def main(argv: list[str]) -> None:
    args = parse(ExportArgs, argv, "export")
    run_dir, options = args.run_dir, asdict(args)
    # torch and transformers: only once the arguments are good
    from llmtune.export.merged import export_merged
    from llmtune.export.parity import check_parity
    from llmtune.inference import run_config
    from llmtune.methods import method_of
    from llmtune.models.sources import model_source
    from llmtune.tasks import task_of
    from llmtune.trust import check_run_is_trusted

    cfg = run_config(run_dir)
    trusted = options["trust_remote_code"]
    check_run_is_trusted(cfg, run_dir, trusted)
    fmt = options["format"]
    formats = method_of(cfg, trusted).export_formats
    if fmt not in formats:
        raise UserError(f"{run_dir} is a method={cfg.method.name} run: only format={' or format='.join(formats)} "
                        f"applies to it, not format={fmt}; run llmtune export RUN_DIR format={formats[0]}")
    quant = options["quant"] or DEFAULT_QUANT.get(fmt)
    if fmt != "merged":
        from llmtune.export.gguf_writer import OUTTYPES, write_gguf

        if quant not in OUTTYPES:
            raise UserError(f"quant={quant} is not a GGUF type llmtune writes; use one of {', '.join(OUTTYPES)}")
    if fmt == "ollama" and cfg.get("rag"):
        raise UserError("this run was trained with rag=true and Ollama cannot retrieve context for its prompts: "
                        "export format=gguf or format=merged and add the retrieved context in your application")
    out = Path(options["out"] or run_dir / "export" / fmt)
    check_output_folder(out, options["overwrite"])  # before minutes of merging, not after
    console = Console(soft_wrap=True)  # one line per message, also when piped to a log

    # The export is written into a staging folder that replaces `out` only once complete: an interrupted export
    # never looks finished, and a folder llmtune did not write is never replaced.
    with atomic_folder(out, options["overwrite"], what=f"llmtune export format={fmt}") as staging:
        if fmt == "merged":
            export_merged(run_dir, staging, options["dtype"], options["max_shard_size"], trusted)
            model_path = out
        else:
            # GGUF is written from a merged fp32 folder, so quantisation rounds the merged weights exactly once.
            with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{out.name}.merging-") as scratch:
                merged = export_merged(run_dir, Path(scratch) / "merged", dtype="float32", trust_remote_code=trusted)
                # The tokenizer fields come verbatim from the GGUF the base was converted from, when it has one.
                gguf_name = f"{cfg.model.name}-{cfg.method.name}-{quant}.gguf"
                write_gguf(merged, staging / gguf_name, quant,
                           tokenizer_gguf=model_source(cfg.model, trusted).tokenizer_gguf(),
                           name=run_dir.name)
                if fmt == "ollama":
                    _write_modelfile(run_dir, cfg, merged, staging, gguf_name)
            model_path = out / gguf_name
    console.print(f"[bold]exported[/] {fmt}{f' ({quant})' if fmt != 'merged' else ''} -> {out}  "
                  f"({_size_mb(model_path):,.1f} MB)")
    if options["check"]:
        free_text = task_of(cfg).labels is None  # Q&A: generated answers, compared by ROUGE-L
        threshold = float(options["min_agreement"] or (QA_MIN_AGREEMENT if free_text else
                                                       MIN_AGREEMENT.get(quant if fmt != "merged" else "", 0.99)))
        parity = check_parity(run_dir, model_path, threshold, trusted)
        console.print(f"parity on {parity['rows']} test rows: agreement {parity['agreement']:.1%} "
                      f"(min {threshold:.0%}), {parity['metric']} {parity['export_score']:.3f} vs run "
                      f"{parity['run_score']:.3f} (delta {parity['delta']:+.3f})"
                      f"{_probability_note(parity.get('max_prob_diff'))}, {parity['seconds']} s")


def _probability_note(max_prob_diff: float | None) -> str:
    return "" if max_prob_diff is None else f", max label probability difference {max_prob_diff:.5f}"


def _write_modelfile(run_dir: Path, cfg, merged: Path, out: Path, gguf_name: str) -> None:
    from transformers import AutoTokenizer

    from llmtune.export.ollama import write_modelfile
    from llmtune.inference import prompt_format_of
    from llmtune.tasks import task_of

    tokenizer = AutoTokenizer.from_pretrained(merged)
    prompt_format = prompt_format_of(run_dir, cfg, tokenizer)
    labels = task_of(cfg).labels
    # A classifier answers with one label: generation stops after the longest label's tokens.
    longest = max(len(tokenizer(prompt_format.answer(label), add_special_tokens=False).input_ids)
                  for label in labels) if labels else None
    write_modelfile(out, gguf_name, prompt_format, longest)


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(f.stat().st_size for f in files) / 1e6
