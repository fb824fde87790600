"""Where model files come from: a local folder, the tiny builder (cached), or a Hub id that must be available."""

import pytest

from conftest import compose_config
from llmtune.errors import UserError
from llmtune.models.loader import load_base_model, prepare_model_dir


def test_local_folder_without_config_is_refused(tmp_path):
    cfg = compose_config(["model=tiny", f"model.path={tmp_path}"])
    with pytest.raises(UserError, match="no config.json"):
        prepare_model_dir(cfg.model, tmp_path / "cache")


def test_tiny_model_is_built_once_then_reused(tmp_path):
    cfg = compose_config(["model=tiny"])
    first = prepare_model_dir(cfg.model, tmp_path)
    weights = tmp_path / "models" / "tiny" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert prepare_model_dir(cfg.model, tmp_path) == first and weights.stat().st_mtime_ns == stamp
    tokenizer, model = load_base_model(first, cfg.model)
    assert model.config.hidden_size == cfg.model.source.hidden_size and tokenizer.pad_token is not None


def test_hub_model_missing_offline_names_the_id_and_both_fixes(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = compose_config(["model=gemma2b", "model.source.hub_id=acme/missing-7b"])
    with pytest.raises(UserError) as error:
        prepare_model_dir(cfg.model, tmp_path)
    message = str(error.value)
    assert "acme/missing-7b" in message and "huggingface-cli download" in message and "model.path=DIR" in message


def test_weights_that_fail_to_load_are_one_line(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / name).write_bytes((tiny_model_dir / name).read_bytes())  # no weights file
    cfg = compose_config(["model=tiny", f"model.path={broken}"])
    with pytest.raises(UserError, match="could not load model 'tiny'"):
        load_base_model(prepare_model_dir(cfg.model, tmp_path), cfg.model)
