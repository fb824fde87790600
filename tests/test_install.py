"""The user's own config folder (LLMTUNE_CONFIG_PATH, or Hydra's --config-dir) adds options to the shipped groups.

Building a wheel and running it from a fresh venv is in .ci/run (it needs a venv, too slow for a unit test)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_config

from llmtune.config import CONFIG_DIR, check_overrides
from llmtune.errors import UserError


@pytest.fixture
def user_configs(tmp_path) -> Path:
    """A folder with dataset/mine.yaml: the shipped demo's settings under another name."""
    shipped = (Path(CONFIG_DIR) / "dataset" / "sentiment_demo.yaml").read_text(encoding="utf-8")
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "mine.yaml").write_text(shipped.replace("name: sentiment_demo", "name: mine"))
    return tmp_path


def test_user_config_folder_adds_an_option(user_configs, monkeypatch):
    monkeypatch.setenv("LLMTUNE_CONFIG_PATH", str(user_configs))
    check_overrides(["dataset=mine", "dataset.split.train_per_class=5"])  # an option and a key of the user's file
    assert compose_config(["dataset=mine"]).dataset.name == "mine"
    with pytest.raises(UserError, match="dataset=mien is not a known dataset config .*did you mean 'mine'"):
        check_overrides(["dataset=mien"])


def test_unknown_without_the_folder_and_a_missing_folder_is_one_line(user_configs, monkeypatch):
    monkeypatch.delenv("LLMTUNE_CONFIG_PATH", raising=False)
    with pytest.raises(UserError, match="dataset=mine is not a known dataset config"):
        check_overrides(["dataset=mine"])
    check_overrides(["--config-dir", str(user_configs), "dataset=mine"])  # Hydra's own flag works the same way
    monkeypatch.setenv("LLMTUNE_CONFIG_PATH", str(user_configs / "nowhere"))
    with pytest.raises(UserError, match="LLMTUNE_CONFIG_PATH names .*nowhere, which is not a folder"):
        check_overrides(["dataset=mine"])


def test_cli_prints_the_users_dataset(user_configs, tmp_path):
    """As a user runs it, from a folder that is not the checkout."""
    env = {**os.environ, "LLMTUNE_CONFIG_PATH": str(user_configs)}
    result = subprocess.run([sys.executable, "-m", "llmtune", "dataset=mine", "--cfg", "job"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\n  name: mine\n" in result.stdout and "sentiment_demo.csv" in result.stdout
