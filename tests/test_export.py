"""`llmtune export`: merged folders plain transformers loads, GGUF and Ollama files, each checked against the run."""

import json
import shutil

import pytest
import torch
from conftest import compose_config, run_llmtune
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.data.prompts import PromptFormat
from llmtune.errors import UserError
from llmtune.export.merged import export_merged
from llmtune.export.ollama import modelfile_text, render_template
from llmtune.export.parity import check_parity
from llmtune.inference import load_run

TEXTS = ["Profit rose sharply in the third quarter", "The company cut its outlook", "Shares were unchanged"]


def next_token_logits(model, tokenizer, texts):
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits.float()


def test_merged_export_loads_with_plain_transformers_and_matches_the_adapter(tiny_run, tmp_path):
    merged = export_merged(tiny_run, tmp_path / "merged", dtype="float32", max_shard_size="100KB")
    shards = sorted(p.name for p in merged.glob("*.safetensors"))
    assert len(shards) > 1 and (merged / "model.safetensors.index.json").is_file()  # sharded
    assert not list(merged.glob("*.bin")) and not list(tmp_path.glob("*.partial"))

    plain = AutoModelForCausalLM.from_pretrained(merged)  # no llmtune, no PEFT
    tokenizer = AutoTokenizer.from_pretrained(merged)
    adapter = load_run(tiny_run, dtype="float32")
    prompts = [adapter.prompt_format.prompt(t) for t in TEXTS]
    expected = next_token_logits(adapter.model, adapter.tokenizer, prompts)
    assert torch.allclose(next_token_logits(plain, tokenizer, prompts), expected, atol=1e-4)
    assert json.loads((merged / "prompt.json").read_text()) == json.loads((tiny_run / "prompt.json").read_text())


def test_parity_reports_agreement_and_fails_loudly_below_the_threshold(tiny_run, tmp_path):
    merged = export_merged(tiny_run, tmp_path / "merged")
    parity = check_parity(tiny_run, merged, 0.99)
    assert parity["passed"] and parity["agreement"] == 1.0 and parity["delta"] == 0.0
    assert parity["metric"] == "accuracy"
    run_rows = [json.loads(line) for line in (tiny_run / "predictions.jsonl").read_text().splitlines()]
    assert parity["rows"] == len(run_rows)

    # A broken export: the LM head scrambled, so label scores change.
    broken = tmp_path / "broken"
    shutil.copytree(merged, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    torch.manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 3)
    model.save_pretrained(broken)
    predicted = [p["label"] for p in load_run(tiny_run, broken).classify([r["text"] for r in run_rows])]
    agreement = sum(p == r["predicted"] for p, r in zip(predicted, run_rows)) / len(run_rows)
    with pytest.raises(UserError, match="export check failed"):
        check_parity(tiny_run, broken, agreement + 0.01)
    saved = json.loads((broken / "parity.json").read_text())
    assert saved["passed"] is False and saved["agreement"] == pytest.approx(agreement, abs=1e-4)


def test_qlora_export_dequantises_the_4bit_base_before_merging(cache_dir, tmp_path):
    run_dir = tmp_path / "qlora-run"
    result = run_llmtune(["model=tiny", "method=qlora", "trainer.max_epochs=1", "dataset.split.train_per_class=10",
                          "dataset.split.test_per_class=5", "eval.baseline=false", f"hydra.run.dir={run_dir}"],
                         cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_llmtune(["export", str(run_dir), "format=merged", "dtype=float32"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = run_dir / "export" / "merged"
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config  # plain tensors, not 4-bit weights
    assert json.loads((merged / "parity.json").read_text())["agreement"] == 1.0

    # The merged weights reproduce the 4-bit base + adapter the run trained: closer to it than the same adapter
    # merged into the original full-precision base (the 4-bit forward computes in bf16, hence no exact match).
    quantised = load_run(run_dir, dtype="float32")
    prompts = [quantised.prompt_format.prompt(t) for t in TEXTS]
    expected = next_token_logits(quantised.model, quantised.tokenizer, prompts)
    merged_error = (next_token_logits(AutoModelForCausalLM.from_pretrained(merged), quantised.tokenizer, prompts)
                    - expected).abs().max()
    original = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(cache_dir / "models" / "tiny"),
                                         run_dir / "adapter").merge_and_unload()
    original_error = (next_token_logits(original, quantised.tokenizer, prompts) - expected).abs().max()
    assert merged_error < original_error / 2, (merged_error, original_error)


@pytest.mark.parametrize("model", ["gemma3_270m", "gemma2b", "llama3_8b", "mistral7b_v02", "phi3_mini"])
def test_modelfile_renders_the_family_prompt(model):
    cfg = compose_config([f"model={model}"])
    prompt_format = PromptFormat.from_config(cfg.model, cfg.dataset)  # the family's template from conf/prompt/
    text = modelfile_text("m.gguf", prompt_format, num_predict=2)
    assert text.startswith("FROM ./m.gguf\n") and "PARAMETER temperature 0.2" in text
    assert "PARAMETER num_predict 2" in text
    assert f'SYSTEM """{prompt_format.instruction}"""' in text
    # What Ollama sends the model is the prompt the run was tuned on.
    assert render_template(text, prompt_format.instruction, TEXTS[0]) == prompt_format.prompt(TEXTS[0])
    closing = prompt_format.answer_template.split("{answer}")[1].strip()
    assert (f'PARAMETER stop "{closing}"' in text) == bool(closing)


def test_export_bad_input_one_line(tiny_run, cache_dir, tmp_path):
    for args, expected in [([str(tiny_run), "format=onnx"], "format=onnx is not known"),
                           ([str(tmp_path / "nope"), "format=merged"], "does not exist"),
                           ([str(tiny_run), "format=gguf", "quant=q2_k"], "quant=q2_k is not a GGUF type")]:
        result = run_llmtune(["export", *args], cache_dir)
        assert result.returncode == 2, result.stderr[-1000:]
        assert expected in result.stderr and "Traceback" not in result.stderr
    assert not (tiny_run / "export" / "onnx").exists()


def test_adapter_merged_and_gguf_predictions_agree(tiny_run, cache_dir, tmp_path):
    for fmt, quant in [("gguf", "f32"), ("ollama", "q8_0")]:
        result = run_llmtune(["export", str(tiny_run), f"format={fmt}", f"quant={quant}", f"out={tmp_path / fmt}"],
                             cache_dir)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "parity on 60 test rows: agreement 100.0%" in result.stdout
    f32, q8 = tmp_path / "gguf" / "tiny-instruct-f32.gguf", tmp_path / "ollama" / "tiny-instruct-q8_0.gguf"
    assert json.loads(f32.with_name(f32.name + ".parity.json").read_text())["passed"] is True
    assert not list(tmp_path.rglob(".merging-*")) and not list(tmp_path.rglob("*.partial"))

    merged = export_merged(tiny_run, tmp_path / "merged", dtype="float32")
    scores = {name: [p["scores"] for p in load_run(tiny_run, path, dtype="float32").classify(TEXTS)]
              for name, path in [("adapter", None), ("merged", merged), ("f32", f32), ("q8_0", q8)]}
    for name in ("merged", "f32"):  # the same weights in full precision: the same probabilities
        for got, expected in zip(scores[name], scores["adapter"]):
            assert got == pytest.approx(expected, abs=1e-4), name
    for got, expected in zip(scores["q8_0"], scores["adapter"]):  # 8-bit weights: close, not equal
        assert got == pytest.approx(expected, abs=0.05)

    modelfile = (tmp_path / "ollama" / "Modelfile").read_text()
    prompt_format = load_run(tiny_run, q8).prompt_format
    assert modelfile.startswith(f"FROM ./{q8.name}\n")
    assert render_template(modelfile, prompt_format.instruction, TEXTS[1]) == prompt_format.prompt(TEXTS[1])


def test_qa_export_repeats_the_runs_generated_answers(cache_dir, tmp_path):
    run_dir = tmp_path / "qa-run"
    result = run_llmtune(["model=tiny", "dataset=hr_demo", "trainer.max_epochs=1", "eval.baseline=false",
                          "eval.generation.max_new_tokens=6", f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_llmtune(["export", str(run_dir), "format=merged", "dtype=float32"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    parity = json.loads((run_dir / "export" / "merged" / "parity.json").read_text())
    run_rouge = json.loads((run_dir / "metrics.json").read_text())["results"]["tuned"]["rougeL"]
    assert parity["metric"] == "rougeL" and parity["rows"] == 18 and parity["agreement"] == 1.0
    assert parity["run_score"] == pytest.approx(run_rouge, abs=1e-4) and parity["delta"] == 0.0
