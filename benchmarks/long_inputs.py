"""Peak memory and wall time of a run whose data holds 12,000-character texts, with dataset.max_input_tokens at its
default and at other caps (null: no cap), each arm a fresh `python -m llmtune` process (peak RSS from wait4).

    python benchmarks/long_inputs.py                    # Gemma 3 270M, caps 512 (the default), 1024 and 256
    python benchmarks/long_inputs.py --caps 1024 null --model tiny

The data is written to a temporary folder: the shipped demo sentences of one label, joined until each text passes
12,000 characters, 16 texts per label (8 train, 8 test), the label's own sentences at the end (so the cut side matters).
Writes results/long_inputs.json and results/long_inputs.md (measurements: benchmarks/README.md).
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
CHARACTERS = 12_000
PER_LABEL = 16


def long_rows() -> list[dict]:
    from llmtune.data.loading import resource_path

    with open(resource_path("sentiment_demo.csv"), encoding="utf-8") as handle:
        demo = list(csv.DictReader(handle))
    by_label: dict[str, list[str]] = {}
    for row in demo:
        by_label.setdefault(row["label"], []).append(row["text"])
    neutral = by_label["neutral"]
    rows = []
    for label, texts in sorted(by_label.items()):
        for i in range(PER_LABEL):
            # Neutral filler first, then the label's own sentences: the verdict sits at the end, as in a review.
            filler, k = [], i
            while sum(map(len, filler)) < CHARACTERS - 600:
                filler.append(neutral[k % len(neutral)])
                k += 7
            ending = [texts[(i * 5 + j) % len(texts)] for j in range(5)]
            rows.append({"text": " ".join(filler + ending), "label": label})
    return rows


def run_arm(data: Path, cap: str, model: str, out: Path) -> dict:
    args = [sys.executable, "-m", "llmtune", f"model={model}", "dataset=sentiment_demo", f"dataset.path={data}",
            "dataset.id_column=null", f"dataset.max_input_tokens={cap}", "dataset.truncation=head+tail",
            "dataset.split.train_per_class=8", "dataset.split.test_per_class=8", "dataset.split.val_per_class=0",
            "trainer.max_epochs=1", "trainer.batch_size=4", "eval.batch_size=4", f"hydra.run.dir={out}"]
    started = time.perf_counter()
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        return {"cap": cap, "error": output[-600:], "seconds": round(seconds, 1),
                "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"cap": cap, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
            "truncated": metrics["data"].get("truncated"), "tokens_per_s": round(metrics["train"]["tokens_per_s"]),
            "base_accuracy": round(metrics["results"]["base"]["accuracy"], 3),
            "tuned_accuracy": round(metrics["results"]["tuned"]["accuracy"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", nargs="+", default=["512", "1024", "256"])
    parser.add_argument("--model", default="gemma3_270m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "long.csv"
        rows = long_rows()
        with open(data, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"{len(rows)} rows of {min(len(r['text']) for r in rows)}-{max(len(r['text']) for r in rows)} "
              "characters", flush=True)
        arms = []
        for cap in args.caps:
            arms.append(run_arm(data, cap, args.model, Path(folder) / f"run-{cap}"))
            print(json.dumps(arms[-1]), flush=True)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "long_inputs.json").write_text(json.dumps({"model": args.model, "arms": arms}, indent=2) + "\n")
    lines = [f"model={args.model}, {len(rows)} texts of >= {CHARACTERS} characters (8 train + 8 test per label)", "",
             "| max_input_tokens | wall s | peak RSS GiB | texts cut (train/test) | train tokens/s | base acc | tuned acc |",
             "|---|---|---|---|---|---|---|"]
    for arm in arms:
        cut = arm.get("truncated") or {}
        lines.append(f"| {arm['cap']} | {arm['seconds']} | {arm['peak_rss_gib']} | "
                     f"{cut.get('train', '-')}/{cut.get('test', '-')} | {arm.get('tokens_per_s', '-')} | "
                     f"{arm.get('base_accuracy', '-')} | {arm.get('tuned_accuracy', arm.get('error', '-'))} |")
    (results / "long_inputs.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
