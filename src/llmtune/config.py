"""Where the configs live, the resolvers they use, and the checks that need no model or data."""

import importlib.util
import secrets
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmtune.errors import UserError

# conf/ sits at the repository root (the package is installed editable, as the README does).
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


# Drawn once per process and put in the run folder's name: runs started in the same second get different folders,
# while every job of one multirun shares its sweep folder.
RUN_ID = secrets.token_hex(3)


def register_resolvers() -> None:
    from llmtune.data.loading import resource_path

    if not OmegaConf.has_resolver("llmtune_resource"):
        OmegaConf.register_new_resolver("llmtune_resource", resource_path)
    if not OmegaConf.has_resolver("llmtune_run_id"):
        OmegaConf.register_new_resolver("llmtune_run_id", lambda: RUN_ID)


# Switches a typo must not turn on: Hydra reads `rag=no` as the string "no", which Python would take as true.
BOOLEAN_KEYS = ("rag", "eval.baseline", "eval.generation.do_sample", "trainer.share_prefix", "method.train",
                "method.full_finetune", "method.gradient_checkpointing", "model.trust_remote_code")


def check_config(cfg: DictConfig) -> None:
    """Collect every problem the config alone shows, and raise them together as one line."""
    problems = [f"{key}={OmegaConf.select(cfg, key)!r} must be true or false"
                for key in BOOLEAN_KEYS if not isinstance(OmegaConf.select(cfg, key, default=False), bool)]
    qa = cfg.dataset.get("task", "classification") == "qa"
    head = cfg.method.get("head", "lm")
    if cfg.rag and head == "classifier":
        problems.append("method=classifier reads the raw text, so rag=true has nowhere to put retrieved context; "
                        "use an LM method (instruct, qlora, zeroshot, ...) or rag=false")
    if cfg.rag and qa and not cfg.dataset.get("documents"):
        problems.append(f"rag=true retrieves from dataset.documents, which dataset={cfg.dataset.name} does not set; "
                        "set dataset.documents=DIR (a folder of .txt, .md or .pdf files) or run with rag=false")
    if qa and (head == "classifier" or cfg.method.get("demonstrations")):
        problems.append(f"dataset={cfg.dataset.name} is a Q&A task (generated answers): method={cfg.method.name} "
                        "needs labels; use instruct, causal, qlora or zeroshot (rag=true adds retrieved context)")
    if head not in ("lm", "classifier"):
        problems.append(f"method.head={cfg.method.head!r} must be 'lm' (label scoring) or 'classifier' (a new head)")
    if cfg.method.get("loss_on", "answer") not in ("answer", "all"):
        problems.append(f"method.loss_on={cfg.method.loss_on!r} must be 'answer' or 'all'")
    if not isinstance(getattr(torch, str(cfg.model.dtype), None), torch.dtype):
        problems.append(f"model.dtype={cfg.model.dtype!r} is not a torch dtype; use bfloat16, float16 or float32")
    if not qa and len(set(cfg.dataset.labels)) < 2:
        problems.append("dataset.labels needs at least two distinct labels")
    optimizers = ("adamw", "paged_adamw_8bit", "paged_adamw_32bit")  # see training.module.make_optimizer
    if cfg.method.get("optimizer") and cfg.method.optimizer.get("name", "adamw") not in optimizers:
        problems.append(f"method.optimizer.name={cfg.method.optimizer.name!r} is not known; use one of "
                        f"{', '.join(optimizers)}")
    if cfg.method.get("quantization") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"method={cfg.method.name} quantises the base with bitsandbytes, which is not installed; "
                        "pip install bitsandbytes")
    packing = cfg.trainer.get("packing")
    if packing is not None and (isinstance(packing, bool) or not isinstance(packing, int) or packing < 1):
        problems.append(f"trainer.packing={packing!r} must be a token count (e.g. 512) or null (off)")
    elif packing and head != "lm":
        problems.append(f"trainer.packing packs prompts for next-token training; method={cfg.method.name} trains a "
                        "classification head on raw text: set trainer.packing=null")
    elif packing and cfg.trainer.share_prefix and cfg.method.get("loss_on") == "answer":
        problems.append(f"trainer.packing puts whole prompts end to end, so method={cfg.method.name} cannot also "
                        "compute their shared instruction once (trainer.share_prefix, the faster of the two): set "
                        "trainer.share_prefix=false to pack, or trainer.packing=null")
    for key in ("trainer.batch_size", "eval.batch_size"):
        if OmegaConf.select(cfg, key) < 1:
            problems.append(f"{key} must be at least 1")
    if problems:
        raise UserError("; ".join(problems))


def check_overrides(args: list[str]) -> None:
    """Catch a misspelled group option or key on the command line before Hydra does, with a did-you-mean line.

    Hydra's own messages for these span several lines and suggest `+key=value`, which is wrong for a typo.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:
        return  # a syntax error: Hydra reports it with the position of the problem
    # Root groups (model, method, ...) and, with a package, the groups model files pick: prompt@model=alpaca.
    groups = {p.name: sorted(f.stem for f in p.glob("*.yaml")) for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    root_groups = _root_groups()
    group_choices, keys = [], []
    for override in parsed:
        name = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or name.startswith("hydra"):
            continue
        if name not in root_groups and not (override.package and name in groups):
            keys.append(name)
            continue
        options = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
        for option in options:
            if option not in groups[name]:
                raise UserError(f"{name}={option} is not a known {name} config{_did_you_mean(option, groups[name])}; "
                                f"choose one of {', '.join(groups[name])}")
        group_choices.append(f"{override.get_key_element()}={options[0]}")
    if not keys:
        return
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=group_choices)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
        if node is None:  # e.g. model.build.x on a model whose build is null: a new subtree, let Hydra decide
            continue
        siblings = list(node.keys()) if isinstance(node, DictConfig) else []
        if leaf not in siblings:  # keys(), unlike `in`, also lists keys whose value is still ??? (required)
            hint = _did_you_mean(leaf, siblings, prefix=f"{parent}." if parent else "")
            raise UserError(f"unknown config key '{key}'{hint}; to add a new key on purpose use +{key}=...")


def _root_groups() -> list[str]:
    """The groups train.yaml's defaults list selects (model, method, ...); conf/prompt/ is picked by model files."""
    import yaml

    defaults = yaml.safe_load((Path(CONFIG_DIR) / "train.yaml").read_text(encoding="utf-8"))["defaults"]
    return [next(iter(entry)) for entry in defaults if isinstance(entry, dict)]


def _did_you_mean(word: str, candidates: list[str], prefix: str = "") -> str:
    """' (did you mean 'PREFIX+closest'?)' for a close candidate, else ''."""
    import difflib

    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
