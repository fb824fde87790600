"""What a run tells trackers: the metric names (shared by the loggers, the sweep specs, `llmtune sweep` and
`llmtune report`), the config with secrets masked, and a W&B logger that never blocks a run."""

import netrc
import os
import re
import sys
import uuid
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from llmtune.files import write_atomic

# Logged once at the end of a run (and kept under "logged" in metrics.json). Sweeps should optimise a val/ metric:
# choosing hyper-parameters on the test split would make the test score an optimistic estimate.
CLASSIFICATION_METRICS = ("val/accuracy", "val/macro_f1", "test/accuracy", "test/macro_f1",
                          "base/test_accuracy", "base/test_macro_f1")
# Q&A runs (task=qa): generated answers against the references.
QA_METRICS = ("val/rougeL", "test/bleu", "test/rougeL", "test/ngram_similarity", "test/token_presence",
              "base/test_bleu", "base/test_rougeL", "base/test_ngram_similarity", "base/test_token_presence",
              # eval.judge: present only where the run was judged
              "test/judge_correctness", "test/judge_relevance", "base/test_judge_correctness",
              "base/test_judge_relevance")
FINAL_METRICS = CLASSIFICATION_METRICS + QA_METRICS
# Logged during training by the LightningModule.
STEP_METRICS = ("train/loss", "val/loss")
METRIC_NAMES = FINAL_METRICS + STEP_METRICS


def final_metrics(results: dict) -> dict[str, float]:
    """The FINAL_METRICS present in a run's results ({"base": ..., "tuned": ..., "val": ...} metric dicts)."""
    sources = {"val": "val", "test": "tuned", "base": "base"}
    logged = {}
    for name in FINAL_METRICS:
        prefix, key = name.split("/")
        value = results.get(sources[prefix], {}).get(key.removeprefix("test_"))
        if value is not None:  # e.g. token presence on a dataset that lists no required tokens
            logged[name] = value
    return logged


# Config keys whose values are secrets, e.g. hf_token, api_key, wandb_api_key (but not max_new_tokens).
SECRET_KEY = re.compile(r"(?i)(^|_)(token|secret|password|api_?key|credentials?)$")
# Environment variables that hold secrets: their values are masked wherever they appear in a logged config.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
REDACTED = "<redacted>"


def secret_values(cfg: DictConfig | None = None) -> set[str]:
    """Every secret this process knows of: secret env variables, and values given to secret keys in the config or
    on the command line (`+hf_token=...` would otherwise be copied by Hydra and W&B into their run files)."""
    found = {os.environ[name] for name in SECRET_ENV if os.environ.get(name)}
    for arg in sys.argv[1:]:
        key, sep, value = arg.partition("=")
        if sep and value and SECRET_KEY.search(key.lstrip("+~").rpartition(".")[2]):
            found.add(value)

    def walk(node, key=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for v in node:
                walk(v)
        elif node and SECRET_KEY.search(key):
            found.add(str(node))

    if cfg is not None:
        walk(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))
    return found


def mask_secrets(text: str, secrets: set[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: one secret may contain another
        text = text.replace(secret, REDACTED)
    return text


def public_config(cfg: DictConfig) -> dict:
    """The resolved run config, safe to write and to send to a tracker: no hydra node, secrets masked."""
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    container.pop("hydra", None)
    secrets = secret_values(cfg)

    def mask(node):
        if isinstance(node, dict):
            return {k: mask(v) for k, v in node.items()}
        if isinstance(node, list):
            return [mask(v) for v in node]
        return mask_secrets(node, secrets) if isinstance(node, str) else node

    return mask(container)


def wandb_logger(name: str, group: str, project: str, save_dir: str, mode: str = "auto",
                 entity: str | None = None, tags: list | None = None, init_timeout: float = 30):
    """A Lightning WandbLogger that never blocks or crashes a run.

    mode=auto logs online when an API key is configured (WANDB_API_KEY or `wandb login`) and offline otherwise;
    an online start that fails (no network, bad key) falls back to offline with one notice. Offline runs stay in
    <run dir>/wandb/ and upload later with `wandb sync <run dir>/wandb/offline-run-*`. A run continued in its folder
    continues its W&B run (run_id_of).
    """
    from lightning.pytorch.loggers import WandbLogger

    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key_configured() else "offline")
    run_id = run_id_of(Path(save_dir))

    def start(mode):
        logger = WandbLogger(name=name, group=group, project=project, entity=entity, tags=list(tags or []), id=run_id,
                             save_dir=save_dir, mode=mode, reinit="finish_previous",
                             settings=_wandb_settings(init_timeout))
        # Lightning always passes anonymous=None, which wandb >= 0.19 answers with a deprecation warning per run.
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        # Start now, so a failure is handled here and not in the middle of training. W&B records the command
        # line in the run's metadata: hand it a copy with secrets masked.
        argv, secrets = sys.argv, secret_values()
        sys.argv = [mask_secrets(arg, secrets) for arg in argv]
        try:
            _ = logger.experiment
        finally:
            sys.argv = argv
        return logger

    try:
        logger = start(mode)
        if mode == "offline":  # say where the run went: nothing was uploaded
            run_dir = Path(logger.experiment.dir).parent
            attempts = sorted(run_dir.parent.glob(f"offline-run-*-{run_id}")) if run_id else []
            upload = (f"`wandb sync {run_dir.parent}/offline-run-*-{run_id}` (its {len(attempts)} attempts, in order)"
                      if len(attempts) > 1 else f"`wandb sync {run_dir}`")
            print(f"llmtune: W&B logs offline to {run_dir}; upload it later with {upload}", file=sys.stderr)
        return logger
    except Exception as error:  # wandb raises several types (CommError, UsageError, timeouts)
        if mode != "online":
            raise
        finish_wandb(exit_code=1)
        import wandb

        wandb.teardown()  # W&B's service process holds the failed start's run id until it is shut down
        print(f"llmtune: notice: W&B online start failed ({str(error).splitlines()[0][:160]}); logging offline "
              f"instead, upload later with `wandb sync`", file=sys.stderr)
        return start("offline")


def run_id_of(run_dir: Path) -> str | None:
    """The W&B run id of the run in run_dir, chosen at its first start and kept in <run dir>/wandb/run_id.

    Continued in its folder (after a crash, or with a longer budget), the run logs to the same W&B run, which
    Lightning's WandbLogger opens with resume="allow", instead of starting a second run with half the curves. Under
    `wandb agent` the agent has already named the run (WANDB_RUN_ID): None leaves that to W&B.
    """
    if os.environ.get("WANDB_RUN_ID"):
        return None
    path = run_dir / "wandb" / "run_id"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    run_id = uuid.uuid4().hex[:16]  # W&B takes any id of letters and digits; its own generator is internal
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, run_id + "\n")
    return run_id


def finish_wandb(exit_code: int = 0) -> None:
    """Close the W&B run of this job, if one is open: each job of a multirun must get its own run."""
    wandb = sys.modules.get("wandb")  # imported only when logger=wandb was used
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _wandb_settings(init_timeout: float):
    import wandb

    # No console capture: Lightning's progress bar already goes to the terminal, and W&B's copy of stdout
    # would be one more file to keep free of secrets.
    return wandb.Settings(init_timeout=init_timeout, console="off", silent=True)
