"""`llmtune predict`: files and stdin in, one record per good row out, bad rows named by line, never silently."""

import csv
import io
import json
from pathlib import Path

import pytest
from conftest import run_llmtune

from llmtune.inference import load_run
from llmtune.predict import parse_rows, structured_schema, validate_structured


def test_predict_csv_reproduces_the_runs_own_test_predictions(tiny_run, cache_dir, tmp_path):
    run_rows = [json.loads(line) for line in (tiny_run / "predictions.jsonl").read_text().splitlines()]
    lines = ["id,text"] + [f'{r["id"]},"{r["text"].replace(chr(34), chr(34) * 2)}"' for r in run_rows[:12]]
    lines.insert(4, "bad1,")  # empty text on file line 5
    lines.insert(8, 'bad2,"too",many,fields')  # file line 9
    source = tmp_path / "sentences.csv"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"

    result = run_llmtune(["predict", str(tiny_run), f"input={source}", f"out={out}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "line 5: empty text" in result.stderr and "line 9: 4 fields, the header has 2" in result.stderr
    assert "skipped 2 bad rows" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [str(r["id"]) for r in run_rows[:12]]
    # Same model, same prompt, same scoring as the run's evaluation: the same labels and probabilities.
    assert [r["label"] for r in records] == [r["predicted"] for r in run_rows[:12]]
    for record, row in zip(records, run_rows):
        assert record["scores"] == pytest.approx(row["scores"], abs=2e-4)
        assert record["confidence"] == pytest.approx(max(row["scores"].values()), abs=2e-4)
    assert {r["line"] for r in records}.isdisjoint({5, 9})


def test_predict_stdin_jsonl_structured_output(tiny_run, cache_dir):
    stdin = "\n".join([json.dumps({"text": "Profit rose", "id": "a"}), "{not json", json.dumps("Sales fell"),
                       json.dumps({"body": "no text field"}), ""])
    result = run_llmtune(["predict", str(tiny_run), "input=-", "output=json"], cache_dir, stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "line 2: not valid JSON" in result.stderr and "line 4: neither a string nor an object" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 3] and records[0]["id"] == "a"
    labels = ["positive", "negative", "neutral"]
    for record in records:
        assert set(record["output"]) == {"sentiment", "confidence", "reasoning"}
        assert record["output"]["sentiment"] in labels
    assert "JSON schema valid: 2/2 (100.0%)" in result.stderr


def test_schema_rejects_what_it_should():
    schema = structured_schema("sentiment", ["positive", "negative"])
    good = {"sentiment": "positive", "confidence": 0.9, "reasoning": "r"}
    bad = [{**good, "sentiment": "meh"}, {**good, "confidence": 1.5}, {"sentiment": "positive", "confidence": 0.5},
           {**good, "extra": 1}]
    assert validate_structured([{"output": r} for r in [good, *bad]], schema) == 1


def test_csv_line_numbers_follow_multiline_quoted_text():
    rows, bad = parse_rows('text\n"first\nspans two lines"\n\nsecond\n', Path("x.csv"), "text")
    assert [(r["line"], r["text"]) for r in rows] == [(3, "first\nspans two lines"), (5, "second")]
    assert bad == []


def test_predict_with_exported_model_matches_adapter(tiny_run, cache_dir, tmp_path):
    from llmtune.export.merged import export_merged

    merged = export_merged(tiny_run, tmp_path / "merged")
    texts = ["Profit rose sharply", "The company cut its outlook"]
    loaded = load_run(tiny_run)
    assert not any("lora_" in name for name, _ in loaded.model.named_parameters())  # folded in as it loads
    adapter = loaded.classify(texts)
    exported = load_run(tiny_run, merged).classify(texts)
    for a, b in zip(adapter, exported):
        assert a["label"] == b["label"]
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)


def test_predict_quantize_int8_agrees_with_the_runs_dtype(tiny_run, cache_dir):
    from llmtune.models.int8 import Int8Linear

    run_rows = [json.loads(line) for line in (tiny_run / "predictions.jsonl").read_text().splitlines()][:20]
    loaded = load_run(tiny_run, quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in loaded.model.modules())
    records = loaded.classify([r["text"] for r in run_rows])
    agree = sum(rec["label"] == row["predicted"] for rec, row in zip(records, run_rows))
    assert agree >= 19, agree  # int8 rounding may flip a near tie, not the run's predictions at large
    result = run_llmtune(["predict", str(tiny_run), "input=-", "quantize=int4"], cache_dir, stdin='"x"\n')
    assert result.returncode == 2 and "quantize=int4 is not known; use one of none, int8" in result.stderr


@pytest.mark.parametrize("args, expected", [
    (["input=/no/such.csv"], "input=/no/such.csv does not exist"),
    (["input=-", "output=xml"], "output=xml is not known"),
    (["input=-", "colour=red"], "unknown option 'colour=red'"),
    (["input=-", "batch_size=many"], "batch_size='many' is not an integer"),
])
def test_predict_bad_input_one_line(tiny_run, cache_dir, args, expected):
    result = run_llmtune(["predict", str(tiny_run), *args], cache_dir, stdin="")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("llmtune: error:")
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_predict_names_a_missing_column_and_an_empty_input(tiny_run, cache_dir, tmp_path):
    source = tmp_path / "rows.csv"
    source.write_text("sentence\nProfit rose\n")
    result = run_llmtune(["predict", str(tiny_run), f"input={source}"], cache_dir)
    assert result.returncode == 2 and "no 'text' column" in result.stderr and "text_column=NAME" in result.stderr
    result = run_llmtune(["predict", str(tiny_run), "input=-"], cache_dir, stdin='{"x": 1}\n')
    assert result.returncode == 2 and "no usable rows (0 of 1)" in result.stderr


def test_rag_run_predicts_with_the_runs_own_retrieved_context(cache_dir, tmp_path):
    """A rag=true run: predict rebuilds its retriever and training split, so the run's test predictions repeat."""
    run_dir = tmp_path / "rag-run"
    result = run_llmtune(["model=tiny", "rag=true", "retriever=bm25", "trainer.max_epochs=1",
                          "dataset.split.train_per_class=15", "dataset.split.test_per_class=5", "eval.baseline=false",
                          f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    run_rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    loaded = load_run(run_dir)
    prompts = loaded.prompts([r["text"] for r in run_rows])
    assert all(r["retrieved"][0]["text"] in p for r, p in zip(run_rows, prompts))  # the same demonstrations
    for prediction, row in zip(loaded.classify([r["text"] for r in run_rows]), run_rows):
        assert prediction["label"] == row["predicted"]
        assert prediction["scores"] == pytest.approx(row["scores"], abs=2e-4)


def test_qa_rag_run_answers_questions_as_its_evaluation_did(cache_dir, tmp_path):
    run_dir = tmp_path / "qa-run"
    result = run_llmtune(["model=tiny", "dataset=hr_demo", "rag=true", "retriever=bm25", "trainer.max_epochs=1",
                          "eval.baseline=false", "eval.generation.max_new_tokens=6", f"hydra.run.dir={run_dir}"],
                         cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    run_rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()][:4]
    stdin = "".join(json.dumps({"question": r["text"]}) + "\n" for r in run_rows)
    result = run_llmtune(["predict", str(run_dir), "input=-", "output=csv"], cache_dir, stdin=stdin)
    assert result.returncode == 0, result.stderr[-2000:]
    records = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["text"] for r in records] == [r["text"] for r in run_rows]
    assert [r["answer"] for r in records] == [r["predicted"] for r in run_rows]  # greedy: the run's own answers
    for record, row in zip(records, run_rows):  # the same chunks retrieved, named by document and page
        assert record["sources"].split("; ") == [f"{c['source']} p.{c['page']}" for c in row["retrieved"]]
    result = run_llmtune(["predict", str(run_dir), "input=-", "output=json"], cache_dir, stdin=stdin)
    assert result.returncode == 2 and "is a Q&A run: output=json" in result.stderr
