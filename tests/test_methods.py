"""The methods beyond plain LoRA: QLoRA on a 4-bit base, and the prompting baselines (zeroshot, fewshot)."""

import json

import pytest
import torch
from conftest import compose_config, tiny_dimensions
from omegaconf import open_dict
from peft import PeftModel

from llmtune.tasks import task_of
from llmtune.data.prompts import PromptFormat, encode_example, pad_batch
from llmtune.evaluation.scoring import classify
from llmtune.models.loader import load_base_model
from llmtune.models.lora import add_lora
from llmtune.models.tiny import build_tiny_model
from llmtune.training.module import next_token_loss

SMALL = ["trainer.max_epochs=1", "dataset.split.train_per_class=12", "dataset.split.val_per_class=4",
         "dataset.split.test_per_class=6"]


@pytest.fixture(scope="module")
def tiny64_dir(tmp_path_factory):
    """bitsandbytes' CPU NF4 kernels pack weights in blocks of 64: the tiny model needs dimensions of 64 or more."""
    build = tiny_dimensions(compose_config(["model=tiny"]).model)
    return build_tiny_model(tmp_path_factory.mktemp("tiny64"), **{**build, "hidden_size": 64, "intermediate_size": 128})


def run_job(overrides, model_dir, run_dir, cache_dir):
    from llmtune.run import run

    cfg = compose_config(["model=tiny", *SMALL, *overrides], run_dir, cache_dir)
    with open_dict(cfg):
        cfg.model.path = str(model_dir)
    run(cfg)
    predictions = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return cfg, json.loads((run_dir / "metrics.json").read_text()), predictions


def test_qlora_trains_on_a_4bit_base_and_reloads_to_the_same_predictions(tiny64_dir, tmp_path, cache_dir, caplog):
    cfg, summary, predictions = run_job(["method=qlora", "method.optimizer.lr=1e-2"], tiny64_dir, tmp_path / "q",
                                        cache_dir)
    assert summary["train"]["steps"] > 0 and "CUDA" in caplog.text  # paged AdamW -> torch AdamW on CPU, said so
    tokenizer, base = load_base_model(str(tiny64_dir), cfg.model, cfg.method.quantization)
    linear = base.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == "Linear4bit" and linear.weight.dtype == torch.uint8  # packed NF4
    reloaded = PeftModel.from_pretrained(base, tmp_path / "q" / "adapter")
    rows = task_of(cfg).load_splits(cfg.seed)["test"]
    again = classify(reloaded, tokenizer, rows, PromptFormat.from_config(cfg.model, cfg.dataset, tokenizer),
                     task_of(cfg).labels, 16, "rescoring")
    assert [p["predicted"] for p in again] == [p["predicted"] for p in predictions]
    for before, after in zip(predictions, again):  # the run's scores are temperature-scaled: compare the logits
        assert after["logits"] == pytest.approx(before["logits"], abs=2e-2)
    # Training moved the adapter: the tuned scores are not the base model's.
    assert any(p["scores"] != p["base_scores"] for p in predictions)


def test_qlora_gradients_are_the_same_after_the_base_model_was_scored(tiny64_dir):
    """Scoring the base model first (eval mode, no gradients) must not change what training computes: bitsandbytes
    would otherwise repack the 4-bit weights for a CPU kernel without a backward (models.lora.keep_4bit_layout_trainable).
    """
    cfg = compose_config(["model=tiny", "method=qlora"])

    def lora_gradients(score_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        tokenizer, base = load_base_model(str(tiny64_dir), cfg.model, cfg.method.quantization)
        model = add_lora(base, cfg.model, cfg.method)
        batch = pad_batch([encode_example(tokenizer, "Profit rose by a third =", " positive", "answer")],
                          tokenizer.pad_token_id)
        if score_first:
            model.eval()
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=batch["input_ids"])
        model.train()
        next_token_loss(model, batch).backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    plain, after_scoring = lora_gradients(False), lora_gradients(True)
    first_layer = [name for name in plain if "layers.0." in name and "lora_B" in name]
    assert first_layer and all(plain[name].abs().sum() > 0 for name in first_layer)  # reached through layer 1
    for name, gradient in plain.items():
        assert torch.allclose(after_scoring[name], gradient, atol=1e-6), name


def test_zeroshot_is_the_base_model_and_trains_nothing(tiny_model_dir, tmp_path, cache_dir):
    _, summary, predictions = run_job(["method=zeroshot"], tiny_model_dir, tmp_path / "z", cache_dir)
    assert summary["train"]["steps"] == 0 and summary["run"]["lora"] is None
    # Identical up to the temperature fitted on val, which rescales the tuned confidences and never a label.
    calibration_keys = {"ece", "brier", "reliability", "before_scaling"}
    tuned, base = summary["results"]["tuned"], summary["results"]["base"]
    assert {k: v for k, v in tuned.items() if k not in calibration_keys} == {
        k: v for k, v in base.items() if k not in calibration_keys}
    for key in ("ece", "brier"):  # the scores are stored rounded to 5 places, the logits' softmax is not
        assert tuned["before_scaling"][key] == pytest.approx(base[key], abs=1e-4)
    assert all(p["predicted"] == p["base_predicted"] for p in predictions)
    assert not (tmp_path / "z" / "adapter").exists() and not (tmp_path / "z" / "checkpoints").exists()
    assert "| metric | base | zeroshot |" in (tmp_path / "z" / "report.md").read_text()


def test_fewshot_scores_with_demonstrations_and_no_training(tiny_model_dir, tmp_path, cache_dir):
    _, summary, predictions = run_job(["method=fewshot", "method.demonstrations.shots_per_label=2"], tiny_model_dir,
                                      tmp_path / "f", cache_dir)
    assert summary["train"]["steps"] == 0
    # Same model, longer prompt: the label probabilities move away from the zero-shot ones.
    assert any(p["scores"] != p["base_scores"] for p in predictions)
    assert set(summary["logged"]) >= {"test/accuracy", "base/test_accuracy", "val/accuracy"}


def test_classifier_method_runs_end_to_end_with_a_lora_adapter_holding_the_head(tiny_model_dir, tmp_path, cache_dir):
    from safetensors import safe_open

    _, summary, predictions = run_job(["method=classifier"], tiny_model_dir, tmp_path / "c", cache_dir)
    assert summary["train"]["steps"] > 0 and summary["run"]["lora"]["r"] == 16
    assert set(summary["results"]) == {"val", "tuned"}  # a new head has no untuned answer: no base column
    assert "base_predicted" not in predictions[0] and len(predictions) == summary["results"]["tuned"]["n"]
    assert summary["results"]["tuned"]["accuracy"] == pytest.approx(
        sum(p["gold"] == p["predicted"] for p in predictions) / len(predictions))
    with safe_open(tmp_path / "c" / "adapter" / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert any("lora_A" in key for key in keys) and any(".score." in key for key in keys)  # LoRA + the new head
    assert "| accuracy | - |" in (tmp_path / "c" / "report.md").read_text()


def test_full_finetune_classifier_saves_a_model_that_plain_transformers_reloads(tiny_model_dir, tmp_path, cache_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, summary, predictions = run_job(["method=classifier", "method.full_finetune=true"], tiny_model_dir,
                                        tmp_path / "f", cache_dir)
    assert summary["run"]["lora"] is None and not (tmp_path / "f" / "adapter").exists()
    model_dir = tmp_path / "f" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    assert model.config.id2label == dict(enumerate(cfg.dataset.labels))
    with torch.no_grad():
        for prediction in predictions[:5]:
            logits = model(input_ids=torch.tensor([tokenizer(prediction["text"]).input_ids])).logits[0]
            assert list(prediction["logits"].values()) == pytest.approx(logits.tolist(), abs=1e-4)
            # scores: the logits' softmax after the temperature fitted on val
            calibrated = torch.softmax(logits / summary["calibration"]["temperature"], -1).tolist()
            assert list(prediction["scores"].values()) == pytest.approx(calibrated, abs=1e-4)


EXPERIMENTS = {  # experiment -> what the article's setup fixes
    "fpb_llama2_qlora": {"model.name": "llama2_7b", "method.name": "qlora", "method.lora.r": 64,
                         "method.lora.lora_alpha": 16, "method.lora.lora_dropout": 0.1,
                         "method.optimizer._target_": "llmtune.training.module.paged_adamw",
                         "method.optimizer.bits": 32, "method.scheduler.warmup_ratio": 0.03,
                         "trainer.max_epochs": 3, "dataset.split.train_per_class": 300,
                         "method.quantization.bnb_4bit_quant_type": "nf4"},
    "fpb_gemma7b_qlora": {"model.name": "gemma7b", "method.name": "qlora", "method.lora.r": 64,
                          "trainer.max_epochs": 3},
    "fpb_llama3_qlora": {"model.name": "llama3_8b", "method.lora.lora_alpha": 16, "trainer.gradient_clip_val": 0.3},
    "fpb_gemma3_270m": {"model.name": "gemma3_270m", "method.name": "instruct", "trainer.max_epochs": 2},
    "imdb_distilbert_classifier": {"model.name": "distilbert", "method.name": "classifier",
                                   "method.full_finetune": True, "method.optimizer.lr": 2e-5,
                                   "dataset.name": "imdb", "trainer.max_epochs": 2},
}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENTS))
def test_experiment_overlays_reproduce_the_articles_setups(experiment, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    for key, expected in EXPERIMENTS[experiment].items():
        assert OmegaConf.select(cfg, key) == expected, key


def test_every_experiment_file_is_tested():
    from pathlib import Path

    files = {p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")}
    assert files == set(EXPERIMENTS)


def test_dora_and_rslora_are_pefts_own_and_reload(tiny_model_dir, tmp_path, cache_dir):
    from safetensors import safe_open

    cfg, summary, predictions = run_job(["method.lora.use_dora=true", "method.lora.use_rslora=true",
                                         "method.optimizer.lr=1e-2"], tiny_model_dir, tmp_path / "d", cache_dir)
    adapter = tmp_path / "d" / "adapter"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        assert any("lora_magnitude_vector" in key for key in weights.keys())  # DoRA's learned magnitudes
    tokenizer, base = load_base_model(str(tiny_model_dir), cfg.model, None)
    reloaded = PeftModel.from_pretrained(base, adapter)
    # rsLoRA: lora_alpha / sqrt(r), not lora_alpha / r
    assert reloaded.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(
        cfg.method.lora.lora_alpha / cfg.method.lora.r ** 0.5)
    rows = task_of(cfg).load_splits(cfg.seed)["test"]
    again = classify(reloaded, tokenizer, rows, PromptFormat.from_config(cfg.model, cfg.dataset, tokenizer),
                     task_of(cfg).labels, 16, "rescoring")
    assert [p["predicted"] for p in again] == [p["predicted"] for p in predictions]


def test_full_finetune_of_an_instruct_run_saves_a_causal_lm_that_plain_transformers_reloads(tiny_model_dir, tmp_path,
                                                                                         cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, summary, predictions = run_job(["method.full_finetune=true", "method.optimizer.lr=1e-3"], tiny_model_dir,
                                        tmp_path / "full", cache_dir)
    model_dir = tmp_path / "full" / "model"
    assert summary["run"]["lora"] is None and not (tmp_path / "full" / "adapter").exists()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = [name for name, weight in model.state_dict().items()
             if not torch.equal(weight, original.state_dict()[name])]
    assert any("embed_tokens" in name for name in moved) and any("mlp" in name for name in moved)  # every weight
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = task_of(cfg).load_splits(cfg.seed)["test"]
    again = classify(model, tokenizer, rows, PromptFormat.from_config(cfg.model, cfg.dataset, tokenizer),
                     task_of(cfg).labels, 16, "rescoring")
    assert [p["predicted"] for p in again] == [p["predicted"] for p in predictions]
    for before, after in zip(predictions, again):
        assert after["logits"] == pytest.approx(before["logits"], abs=1e-3)


def test_gradient_checkpointing_trains_every_row_with_its_instruction(tiny_model_dir):
    """transformers switches the KV cache off inside checkpointed layers, which would leave a shared prefix's cache
    empty: with method.gradient_checkpointing the rows carry their own prefix, and the loss is the plain one."""
    from llmtune.config import build_components

    losses, batches = {}, {}
    for checkpointing in (False, True):
        cfg = compose_config(["model=tiny", f"method.gradient_checkpointing={str(checkpointing).lower()}",
                              "dataset.split.train_per_class=4", "dataset.split.test_per_class=2"])
        with open_dict(cfg):
            cfg.model.path = str(tiny_model_dir)
        task, method = build_components(cfg)
        splits = task.load_splits(cfg.seed)
        method.build(cfg.model, task, str(tiny_model_dir))
        prompts = PromptFormat.from_config(cfg.model, cfg.dataset, method.tokenizer)
        train_loader, _ = method.loaders(task, splits, prompts, cfg.trainer, cfg.seed)
        batch = next(iter(train_loader))
        method.model.train()
        batches[checkpointing] = batch
        losses[checkpointing] = float(next_token_loss(method.model, batch))
    assert "prefix_ids" in batches[False] and "prefix_ids" not in batches[True]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_neftune_noise_is_added_while_training_only_and_removed_after(tiny_model_dir):
    from llmtune.methods.base import noisy_embeddings

    cfg = compose_config(["model=tiny"])
    _, base = load_base_model(str(tiny_model_dir), cfg.model, None)
    model = add_lora(base, cfg.model, cfg.method)
    embeddings, ids = model.get_input_embeddings(), torch.tensor([[3, 7, 11, 5]])
    clean = embeddings(ids).detach()
    with noisy_embeddings(model, 5.0):
        model.train()
        noisy = embeddings(ids).detach()
        model.eval()
        assert torch.equal(embeddings(ids), clean)  # validation inside fit sees clean embeddings
    assert not torch.equal(noisy, clean)
    # NEFTune's scale: uniform in +-alpha / sqrt(tokens x width)
    assert (noisy - clean).abs().max() <= 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5 + 1e-6
    model.train()
    assert torch.equal(embeddings(ids), clean) and not embeddings._forward_hooks  # the hook is gone


def test_label_smoothing_and_neftune_train_another_adapter_from_the_same_seed(tiny_model_dir, tmp_path, cache_dir):
    from safetensors.torch import load_file

    plain_cfg, plain, _ = run_job(["method.optimizer.lr=1e-2"], tiny_model_dir, tmp_path / "plain", cache_dir)
    cfg, summary, predictions = run_job(["method.optimizer.lr=1e-2", "method.label_smoothing=0.1",
                                         "method.neftune_noise_alpha=5"], tiny_model_dir, tmp_path / "reg", cache_dir)
    assert summary["train"]["steps"] == plain["train"]["steps"] > 0 and len(predictions) == plain["run"]["n_test"]
    assert cfg.method.label_smoothing == 0.1 and plain_cfg.method.neftune_noise_alpha == 0.0
    plain_weights = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    weights = load_file(tmp_path / "reg" / "adapter" / "adapter_model.safetensors")
    assert weights.keys() == plain_weights.keys()
    assert any(not torch.allclose(weights[k], plain_weights[k]) for k in weights)  # same seed, other training
