"""Shared fixtures: the real Hydra config composed with the compose API, and a tiny model saved to disk."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from llmtune.config import CONFIG_DIR, register_resolvers

# Tests never reach the Hub; the tiny model is cached per test session, never in the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
register_resolvers()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llmtune-cache")
    os.environ["LLMTUNE_CACHE"] = str(path)
    return path


def compose_config(overrides: list[str], output_dir: Path | None = None, cache: Path | None = None):
    """The real conf/ composed as the CLI would, with the run directory and cache pointed at test folders."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
        if cache is not None:
            cfg.paths.cache_dir = str(cache)
    return cfg


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from llmtune.models.tiny import build_tiny_model

    cfg = compose_config(["model=tiny"])
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), **cfg.model.build)
