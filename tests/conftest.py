"""Shared fixtures: the real Hydra config composed with the compose API, and a tiny model saved to disk."""

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from cli_server import run_llmtune_in
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


def tiny_dimensions(model_cfg) -> dict:
    """The tiny model's build settings: its source node without `_target_`."""
    return {k: v for k, v in model_cfg.source.items() if k != "_target_"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from llmtune.models.tiny import build_tiny_model

    cfg = compose_config(["model=tiny"])
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), **tiny_dimensions(cfg.model))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cache_dir) -> Path:
    """A finished tiny-model instruct run (adapter/, predictions.jsonl, prompt.json), made once by the real CLI and
    shared by the predict, serve and export tests. Read it; copy it before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    result = run_llmtune(["model=tiny", "trainer.max_epochs=2", "dataset.split.train_per_class=30",
                          "dataset.split.test_per_class=20", f"hydra.run.dir={run_dir}"], cache_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def run_llmtune(args: list[str], cache_dir: Path, stdin: str | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`python -m llmtune ARGS` as a user runs it (offline, test cache, no HYDRA_FULL_ERROR), from `cwd` (default: the
    package's folder), through the test command server (tests/cli_server.py)."""
    env = {**os.environ, "LLMTUNE_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return run_llmtune_in(cwd or Path(CONFIG_DIR).parent, args, env, stdin=stdin)


@contextmanager
def serving(app) -> Iterator[str]:
    """app on a uvicorn server in a background thread, on a free loopback port, stopped on leaving: yields its base
    URL, http://127.0.0.1:PORT. A real HTTP server, as users' clients meet it."""
    sock = socket.create_server(("127.0.0.1", 0))  # the port is held from the start: no race for it
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive())
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)
