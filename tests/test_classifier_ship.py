"""method=classifier runs ship like the LM runs: `llmtune predict`, `llmtune serve` (/v1/classify) and `llmtune export
format=merged` use the run's head exactly as its evaluation did, for LoRA and full fine-tuning alike."""

import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from conftest import run_llmtune
from omegaconf import OmegaConf
from test_classifier import save_encoder
from test_serve import assert_error, classify_behind_a_held_first_request, running
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from llmtune.files import OUTPUT_MARKER
from llmtune.inference import fitted_temperature, load_run
from llmtune.predict import _record, _to_csv
from llmtune.serve import create_app

LABELS = ["positive", "negative", "neutral"]
SMALL = ["trainer.max_epochs=2", "dataset.split.train_per_class=30", "dataset.split.test_per_class=20",
         "eval.baseline=false"]


def make_run(run_dir, cache_dir, *overrides):
    result = run_llmtune(["method=classifier", *SMALL, *overrides, f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, cache_dir):
    """LoRA on the tiny Llama's body and a new score head (adapter/)."""
    return make_run(tmp_path_factory.mktemp("classifier") / "run", cache_dir, "model=tiny")


@pytest.fixture(scope="module")
def full_classifier_run(tmp_path_factory, cache_dir):
    """Every weight trained (model/, no adapter)."""
    return make_run(tmp_path_factory.mktemp("classifier-full") / "run", cache_dir, "model=tiny",
                    "method.full_finetune=true")


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, cache_dir):
    """A tiny BERT encoder (model=minilm's YAML) from a folder the run's config names: model.path."""
    encoder = save_encoder(tmp_path_factory.mktemp("tiny-bert"), BertModel, lambda **ids: BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, initializer_range=0.1,
        **ids))
    return make_run(tmp_path_factory.mktemp("classifier-bert") / "run", cache_dir, "model=minilm",
                    f"model.path={encoder}")


def run_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]


def write_csv(path, rows: list[dict]):
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text"])
        writer.writerows([r["id"], r["text"]] for r in rows)
    return path


def assert_same_as_the_run(records: list[dict], rows: list[dict], label_key: str = "label") -> None:
    assert [r[label_key] for r in records] == [r["predicted"] for r in rows]
    for record, row in zip(records, rows):
        assert record["scores"] == pytest.approx(row["scores"], abs=2e-4)
        assert record["confidence"] == pytest.approx(max(row["scores"].values()), abs=2e-4)


@pytest.mark.parametrize("run", ["classifier_run", "full_classifier_run"])
def test_predict_reproduces_the_classifier_runs_own_test_predictions(run, request, cache_dir, tmp_path):
    run_dir = request.getfixturevalue(run)
    rows = run_rows(run_dir)
    source, out = write_csv(tmp_path / "test.csv", rows), tmp_path / "out.jsonl"
    result = run_llmtune(["predict", str(run_dir), f"input={source}", f"out={out}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"predicted {len(rows)} rows" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == [str(r["id"]) for r in rows]
    assert_same_as_the_run(records, rows)
    assert all("raw_label" not in r for r in records)  # dataset.labels lists the words: nothing to map back

    structured = run_llmtune(["predict", str(run_dir), f"input={source}", "out=-", "output=json"], cache_dir)
    assert structured.returncode == 0, structured.stderr[-2000:]
    assert f"JSON schema valid: {len(rows)}/{len(rows)}" in structured.stderr
    outputs = [json.loads(line)["output"] for line in structured.stdout.splitlines()]
    assert [o["sentiment"] for o in outputs] == [r["predicted"] for r in rows]


def test_predict_cuts_texts_at_the_heads_max_length_as_the_run_did(classifier_run):
    loaded = load_run(classifier_run)
    long_text = "Profit rose sharply. " * 100  # far over method.max_length=128 tokens
    assert len(loaded.tokenizer(long_text).input_ids) > 2 * loaded.method.max_length
    # The causal head reads the last token it is given: past the cut, nothing the text adds may change the answer.
    same = loaded.classify([long_text, long_text + "The plant will be closed and the loss widened."])
    assert same[0]["scores"] == pytest.approx(same[1]["scores"], abs=1e-5)
    assert loaded.prompts(["Profit rose"]) == ["Profit rose"]  # the raw text: no prompt around it


def test_trust_boundary_holds_for_classifier_runs_and_an_encoder_reproduces_its_run(encoder_run, cache_dir,
                                                                                    tmp_path):
    rows = run_rows(encoder_run)
    source = write_csv(tmp_path / "test.csv", rows)
    for command in (["predict", str(encoder_run), f"input={source}", "out=-"],
                    ["serve", str(encoder_run), f"port={free_port()}"],
                    ["export", str(encoder_run), "format=merged", f"out={tmp_path / 'merged'}"]):
        refused = run_llmtune(command, cache_dir)
        assert refused.returncode == 2, refused.stderr[-2000:]
        lines = refused.stderr.strip().splitlines()
        assert lines[-1].startswith("llmtune: error:") and "model.path=" in lines[-1]
        assert "trust_remote_code=true" in lines[-1] and "Traceback" not in refused.stderr
    assert not (tmp_path / "merged").exists()

    trusted = run_llmtune(["predict", str(encoder_run), f"input={source}", "out=-", "trust_remote_code=true"],
                          cache_dir)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert_same_as_the_run([json.loads(line) for line in trusted.stdout.splitlines()], rows)


@pytest.mark.parametrize("run", ["classifier_run", "full_classifier_run"])
def test_merged_export_loads_with_plain_transformers_and_passes_parity(run, request, cache_dir, tmp_path):
    run_dir = request.getfixturevalue(run)
    out = tmp_path / "merged"
    result = run_llmtune(["export", str(run_dir), "format=merged", f"out={out}", "max_shard_size=100KB"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = run_rows(run_dir)
    assert f"parity on {len(rows)} test rows: agreement 100.0%" in result.stdout
    assert "max label probability difference" in result.stdout
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["identical"] == len(rows) and parity["delta"] == 0.0
    assert parity["max_prob_diff"] <= 2e-4

    # What the folder holds: safetensors and a tokenizer, the merge done (no adapter, no PEFT wrapper), llmtune's mark.
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    assert (out / OUTPUT_MARKER).is_file() and not (out / "prompt.json").exists()  # a head reads no prompt
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["id2label"] == {str(i): label for i, label in enumerate(LABELS)}
    assert config["label2id"] == {label: i for i, label in enumerate(LABELS)}

    # Plain transformers, no llmtune and no PEFT: the trained head's logits, row by row (the run's scores are their
    # softmax after the temperature fitted on val, which llmtune predict and serve apply from metrics.json).
    tokenizer, model = AutoTokenizer.from_pretrained(out), AutoModelForSequenceClassification.from_pretrained(out)
    model.eval()
    with torch.no_grad():
        for row in rows[:10]:
            ids = tokenizer(row["text"], truncation=True, max_length=128, return_tensors="pt")
            logits = model(**ids).logits[0]
            assert logits.tolist() == pytest.approx(list(row["logits"].values()), abs=2e-3)
            calibrated = torch.softmax(logits / fitted_temperature(run_dir), -1).tolist()
            assert calibrated == pytest.approx(list(row["scores"].values()), abs=2e-4)
            assert model.config.id2label[int(logits.argmax())] == row["predicted"]

    # predict model=DIR uses the export as the run's own weights.
    exported = load_run(run_dir, out).classify([r["text"] for r in rows[:8]])
    assert_same_as_the_run(exported, rows[:8])


def test_merged_export_is_atomic_and_never_replaces_a_folder_llmtune_did_not_write(classifier_run, cache_dir,
                                                                                 tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = run_llmtune(["export", str(classifier_run), "format=merged", f"out={mine}", "overwrite=true"], cache_dir)
    assert result.returncode == 2 and "never replaced" in result.stderr
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.parametrize("fmt", ["gguf", "ollama"])
def test_gguf_and_ollama_exports_of_a_classifier_run_are_one_line(fmt, classifier_run, cache_dir, tmp_path):
    result = run_llmtune(["export", str(classifier_run), f"format={fmt}", f"out={tmp_path / fmt}"], cache_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmtune: error:"), result.stderr
    assert "method=classifier" in lines[0] and "only format=merged applies" in lines[0]
    assert not (tmp_path / fmt).exists()


@pytest.fixture(scope="module")
def loaded_classifier(classifier_run):
    return load_run(classifier_run)


def test_serve_classifies_with_the_head_and_refuses_generation(loaded_classifier, classifier_run):
    rows = run_rows(classifier_run)[:6]
    with running(create_app(loaded_classifier, max_prompt_tokens=256)) as http:
        response = http.post("/v1/classify", json={"input": [r["text"] for r in rows]})
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [d["index"] for d in data] == list(range(len(rows)))
        assert_same_as_the_run(data, rows)

        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Profit rose"}]})
        assert_error(chat, 400, "does not generate text")
        assert chat.json()["error"]["code"] == "model_does_not_generate"
        assert_error(http.post("/v1/completions", json={"prompt": "Profit rose"}), 400, "use POST /v1/classify")
        assert_error(http.post("/v1/completions", json={"prompt": "x", "model": "other"}), 404, "not served here")
        assert_error(http.post("/v1/classify", json={"input": ""}), 400, "input 0 is empty")
        assert_error(http.post("/v1/classify", json={"input": "profit " * 600}), 400, "max_prompt_tokens")
        models = http.get("/v1/models").json()["data"]
        assert [m["id"] for m in models] == [loaded_classifier.name]
        assert http.post("/v1/classify", json={"input": rows[0]["text"]}).status_code == 200  # still serving


def test_concurrent_classify_requests_share_one_scoring_call(loaded_classifier):
    requests = [["Profit rose sharply."], ["The company cut its forecast.", "Sales were flat."], ["Orders jumped."]]
    gate, responses = classify_behind_a_held_first_request(loaded_classifier, requests)
    assert gate.calls == [1, sum(len(texts) for texts in requests[1:])]
    for texts, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        for got, alone in zip(response.json()["data"], loaded_classifier.classify(texts), strict=True):
            assert got["label"] == alone["label"] and got["scores"] == pytest.approx(alone["scores"], abs=1e-4)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_command_starts_for_a_classifier_run_and_lists_only_its_routes(full_classifier_run, cache_dir,
                                                                             tmp_path):
    port = free_port()
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "llmtune", "serve", str(full_classifier_run), f"port={port}"],
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        banner = [server.stdout.readline() for _ in range(3)]
        assert banner[0].startswith("llmtune serve:") and f":{port}" in banner[0], (tmp_path / "serve.log").read_text()
        assert "/v1/classify" in banner[2] and server.poll() is None
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/v1/classify", json={"input": "Profit rose."})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server never answered"
                time.sleep(0.2)
        assert response.status_code == 200 and response.json()["data"][0]["label"] in LABELS
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    rest = server.stdout.read()
    assert "/v1/chat/completions" not in rest and "/v1/completions" not in rest


def test_records_carry_the_raw_label_where_dataset_labels_map_raw_values():
    prediction = {"label": "negative", "confidence": 0.7, "scores": {"positive": 0.1, "negative": 0.7, "neutral": 0.2}}
    mapping = {"1": "positive", "-1": "negative", "0": "neutral"}
    row = {"line": 2, "text": "Sales fell", "id": "a"}
    record = _record(row, prediction, "jsonl", "sentiment", mapping)
    assert record["label"] == "negative" and record["raw_label"] == "-1"
    structured = _record(row, prediction, "json", "sentiment", mapping)
    assert structured["raw_label"] == "-1" and "raw_label" not in structured["output"]  # the schema's object as is
    table = list(csv.DictReader(io.StringIO(_to_csv([record]))))
    assert table[0]["raw_label"] == "-1" and table[0]["label"] == "negative" and table[0]["p_negative"] == "0.7"
    plain = _record(row, prediction, "jsonl", "sentiment", None)
    assert "raw_label" not in plain and "raw_label" not in _to_csv([plain])


@pytest.mark.parametrize("run", ["classifier_run", "tiny_run"])
def test_predict_writes_the_raw_value_of_a_mapped_label(run, request, cache_dir, tmp_path):
    """The same run with dataset.labels written as {raw value: word} (the words and their order unchanged): the same
    predictions, each with its raw value beside the word."""
    original = request.getfixturevalue(run)
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    raw = {"positive": 1, "negative": -1, "neutral": 0}
    cfg.dataset.labels = {raw[word]: word for word in cfg.dataset.labels}
    OmegaConf.save(cfg, run_dir / "config.yaml")
    rows = run_rows(original)[:8]
    source = write_csv(tmp_path / "rows.csv", rows)
    for output in ("jsonl", "csv", "json"):
        result = run_llmtune(["predict", str(run_dir), f"input={source}", "out=-", f"output={output}"], cache_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        if output == "csv":
            records = list(csv.DictReader(io.StringIO(result.stdout)))
        else:
            records = [json.loads(line) for line in result.stdout.splitlines()]
        labels = [r["output"]["sentiment"] if output == "json" else r["label"] for r in records]
        assert labels == [r["predicted"] for r in rows]
        assert [r["raw_label"] for r in records] == [str(raw[label]) for label in labels]
