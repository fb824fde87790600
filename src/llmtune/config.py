"""Where the configs live, the resolvers they use, and the checks that need no model or data."""

import importlib.util
import inspect
import itertools
import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmtune.errors import UserError

# The shipped configs: llmtune/conf inside an installed wheel, else conf/ at the root of the checkout (an editable
# install); setup.py maps the one to the other, so there is a single copy.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parents[2] / "conf")
# The user's own config folders (dataset/mine.yaml, model/...), os.pathsep-separated: train.yaml puts them on Hydra's
# search path after the shipped conf/, so they add options and never shadow a shipped one.
CONFIG_PATH_ENV = "LLMTUNE_CONFIG_PATH"


# Drawn once per process and put in the run folder's name: runs started in the same second get different folders,
# while every job of one multirun shares its sweep folder.
RUN_ID = secrets.token_hex(3)


def register_resolvers() -> None:
    from llmtune.data.loading import resource_path
    from llmtune.training.distributed import global_rank, rank_zero_only

    if not OmegaConf.has_resolver("llmtune_resource"):
        OmegaConf.register_new_resolver("llmtune_resource", resource_path)
    if not OmegaConf.has_resolver("llmtune_run_id"):
        # Cached like Hydra's ${now:}: Hydra copies a config's resolver cache into each job's config, so a job that
        # the submitit launcher runs in another process puts its folder in the sweep folder the launcher made.
        OmegaConf.register_new_resolver("llmtune_run_id", lambda: RUN_ID, use_cache=True)
    if not OmegaConf.has_resolver("llmtune_config_path"):
        OmegaConf.register_new_resolver("llmtune_config_path", user_search_path)
    if not OmegaConf.has_resolver("llmtune_rank_zero_only"):
        OmegaConf.register_new_resolver("llmtune_rank_zero_only", rank_zero_only)
    if not OmegaConf.has_resolver("llmtune_rank"):
        OmegaConf.register_new_resolver("llmtune_rank", global_rank)
    if not OmegaConf.has_resolver("llmtune_precision"):
        OmegaConf.register_new_resolver("llmtune_precision", default_precision)


def default_precision() -> str:
    """trainer.precision unless set: bf16 autocast on a CUDA GPU that has bf16 (Ampere and later), full fp32 on a CPU
    (where the frozen base is already bf16 and autocast would cast the fp32 LoRA matmuls for no gain)."""
    import torch

    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def user_config_dirs() -> list[Path]:
    return [Path(d).expanduser().resolve() for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d]


def user_search_path() -> list[str]:
    """train.yaml's hydra.searchpath: each folder of LLMTUNE_CONFIG_PATH as a Hydra config source."""
    return [f"file://{d}" for d in user_config_dirs()]


# Every component the run instantiates from the config; each is checked against its class's signature first.
COMPONENTS = {"task": {"dataset"}, "method": set(), "logger": set(), "callbacks": set(), "retriever": set()}
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}


def build_components(cfg: DictConfig):
    """The run's Task and Method, instantiated from the config once every value had its type and range (the schema),
    every component its signature's arguments, and the rules between components held; all problems together as one
    UserError line, before a model loads."""
    from llmtune.schema import schema_problems

    used = {key: given for key, given in COMPONENTS.items() if key != "retriever" or cfg.rag is True}
    problems = schema_problems(cfg)
    problems += [problem for key, given in used.items() for problem in signature_problems(cfg[key], key, given)]
    problems += trainer_problems(cfg.trainer, build=not any(p.startswith("trainer.") for p in problems))
    if not any(p.startswith(("task", "method")) for p in problems):
        task = instantiate_component(cfg.task, dataset=cfg.dataset)
        method = instantiate_component(cfg.method, _recursive_=False)
        problems += [p for p in rule_problems(cfg, task, method) if p not in problems]
    if problems:
        raise UserError("; ".join(problems))
    return task, method


def trainer_problems(trainer_cfg: DictConfig, build: bool = True) -> list[str]:
    """trainer/ keys are Lightning Trainer arguments, except the few llmtune reads (training.setup.OWN_KEYS). With
    build (the values have their types), a Trainer is made from them once, with no model and writing nothing, so a
    value only Lightning knows to refuse (trainer.precision=banana, trainer.devices=abc, an accelerator this machine
    lacks) is one line now, not a traceback once the model has loaded and the base model was scored."""
    import lightning as L

    from lightning.pytorch.accelerators import CUDAAccelerator
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    from llmtune.training.setup import OWN_KEYS, trainer_settings

    accepted = [*inspect.signature(L.Trainer.__init__).parameters, *OWN_KEYS]
    problems = [f"trainer.{key} is not a setting of lightning's Trainer or of llmtune's loaders and model selection"
                f"{_did_you_mean(key, accepted, 'trainer.')}" for key in trainer_cfg if key not in accepted]
    if problems or not build:
        return problems
    processes = trainer_cfg.devices * trainer_cfg.get("num_nodes", 1) if isinstance(trainer_cfg.devices, int) else 1
    if processes > trainer_cfg.batch_size:  # each process trains on its share of every batch (data.batching)
        return [f"trainer.batch_size={trainer_cfg.batch_size} is smaller than the {processes} processes of "
                f"trainer.devices={trainer_cfg.devices} x trainer.num_nodes={trainer_cfg.get('num_nodes', 1)}; each "
                f"needs a share of every batch: set trainer.batch_size to {processes} or more"]
    try:
        with _quiet_lightning():
            trainer = L.Trainer(**{**trainer_settings(trainer_cfg), "logger": False, "enable_checkpointing": False,
                                   "enable_progress_bar": False})
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)) \
                and not isinstance(trainer.accelerator, CUDAAccelerator):  # Lightning checks a name, not an object
            raise ValueError(f"{type(trainer.strategy).__name__} shards the model across CUDA GPUs, and this run has "
                             f"none ({type(trainer.accelerator).__name__}); trainer=ddp runs on CPUs")
    except Exception as error:  # ValueError, TypeError, MisconfigurationException: Lightning's own wording
        error = error.__cause__ or error  # a strategy node's own refusal, not Hydra's wrapping of it
        strategy = trainer_cfg.get("strategy")
        if isinstance(strategy, DictConfig):  # a preset's node: named by its class
            strategy = strategy.get("_target_")
        shown = ", ".join([f"trainer.{key}={trainer_cfg[key]}" for key in ("accelerator", "devices", "precision")
                           if key in trainer_cfg] + [f"trainer.strategy={strategy}"] * (strategy not in (None, "auto")))
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        problems.append(f"lightning's Trainer refuses the trainer settings ({shown}): {reason}; change them, or run "
                        "on a machine that has what they ask for (gpu, fsdp and deepspeed need CUDA GPUs)")
    return problems


@contextmanager
def _quiet_lightning():
    """The check's Trainer is not the run's: none of its notices ("GPU available: ...") or warnings are shown."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def instantiate_component(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with a component's own refusal of a value (a UserError) passed on as it is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from None
        raise


def signature_problems(node, path: str, given: set[str] = frozenset()) -> list[str]:
    """Keys of a `_target_` node (and of the `_target_` nodes inside it) that its callable does not take, and required
    arguments it lacks (`given`: passed at instantiation; a `_partial_` node gets the rest when called)."""
    if not isinstance(node, DictConfig):
        return []
    problems = [p for key in node.keys() if key not in HYDRA_KEYS
                for p in signature_problems(node._get_node(key), f"{path}.{key}")]
    if "_target_" not in node:
        return problems
    from hydra._internal.utils import _locate

    try:
        target = _locate(str(node._target_))
    except ImportError:
        return problems + [f"{path}._target_={node._target_} cannot be imported; check the module and class name"]
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    keys = [key for key in node.keys() if key not in HYDRA_KEYS]
    for key in keys:
        if key not in parameters and not takes_any:
            problems.append(f"{path}.{key} is not a setting of {node._target_}{_did_you_mean(key, list(parameters))}; "
                            f"it takes {', '.join(parameters) or 'no settings'}")
    if not node.get("_partial_", False):
        missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
                   and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in keys and name not in given]
        problems += [f"{path} needs {name}: set {path}.{name}=..." for name in missing]
    return problems


def rule_problems(cfg: DictConfig, task, method) -> list[str]:
    """The rules between components that no single signature or type states."""
    problems = []
    if "task" in cfg.dataset and cfg.dataset.task != task.name:  # a dataset file written before tasks were nodes
        problems.append(f"dataset={cfg.dataset.name} sets task: {cfg.dataset.task}, but the run's task is {task.name}: "
                        f"select it in the dataset file's defaults (- override /task@_global_.task: "
                        f"{cfg.dataset.task}) and remove the task key")
    if cfg.rag and not method.prompted:
        problems.append(f"method={method.name} reads the raw text, so rag=true has nowhere to put retrieved context; "
                        "use an LM method (instruct, qlora, zeroshot, ...) or rag=false")
    if cfg.rag and task.labels is None and not cfg.dataset.get("documents"):
        problems.append(f"rag=true retrieves from dataset.documents, which dataset={cfg.dataset.name} does not set; "
                        "set dataset.documents=DIR (a folder of .txt, .md or .pdf files) or run with rag=false")
    if task.labels is None and (not method.prompted or getattr(method, "demonstrations", None)):
        problems.append(f"dataset={cfg.dataset.name} is a Q&A task (generated answers): method={method.name} "
                        "needs labels; use instruct, causal, qlora or zeroshot (rag=true adds retrieved context)")
    if task.labels is not None and len(set(task.labels)) < 2:
        problems.append("dataset.labels needs at least two distinct labels")
    if cfg.method.get("quantization") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"method={method.name} quantises the base with bitsandbytes, which is not installed; "
                        "pip install bitsandbytes")
    if method.trains and 0 in (cfg.trainer.max_epochs, cfg.trainer.max_steps):
        zero = "max_epochs" if cfg.trainer.max_epochs == 0 else "max_steps"
        problems.append(f"trainer.{zero}=0 trains nothing, so the tuned model would be the base: give it 1 or more "
                        "(-1: no limit), or run method=zeroshot to score the untuned model alone")
    elif method.trains and cfg.trainer.max_epochs == cfg.trainer.max_steps == -1 and not cfg.trainer.get("max_time") \
            and not (cfg.trainer.get("early_stopping") or {}).get("patience"):
        problems.append("trainer.max_epochs=-1 and trainer.max_steps=-1 train without end: set either, or a wall "
                        "budget trainer.max_time=DD:HH:MM:SS")
    packing = cfg.trainer.get("packing")
    if packing is not None and (isinstance(packing, bool) or not isinstance(packing, int) or packing < 1):
        problems.append(f"trainer.packing={packing!r} must be a token count (e.g. 512) or null (off)")
    elif packing and not method.prompted:
        problems.append(f"trainer.packing packs prompts for next-token training; method={method.name} trains a "
                        "classification head on raw text: set trainer.packing=null")
    elif packing and cfg.trainer.share_prefix and cfg.method.get("loss_on") == "answer":
        problems.append(f"trainer.packing puts whole prompts end to end, so method={method.name} cannot also "
                        "compute their shared instruction once (trainer.share_prefix, the faster of the two): set "
                        "trainer.share_prefix=false to pack, or trainer.packing=null")
    return problems


def check_overrides(args: list[str]) -> None:
    """Catch a misspelled group option or key on the command line before Hydra does, with a did-you-mean line.

    Hydra's own messages for these span several lines and suggest `+key=value`, which is wrong for a typo.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.object_type import ObjectType
    parsed = parse_overrides(args)
    for folder in user_config_dirs():
        if not folder.is_dir():
            raise UserError(f"{CONFIG_PATH_ENV} names {folder}, which is not a folder")
    search_path = _search_path_overrides(args)
    root_groups = _root_groups()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()

        def options(group: str, kind: ObjectType = ObjectType.CONFIG) -> list[str]:
            """Hydra's own listing, over its whole search path: the shipped conf/ and the user's folders."""
            return loader.get_group_options(group, kind, config_name="train", overrides=search_path)

        # Root groups (model, method, ...) and, with a package, the groups model files pick: prompt@model=alpaca.
        groups = options("", ObjectType.GROUP)
        group_choices, keys = [], []
        for override in parsed:
            name = override.key_or_group
            if override.is_add() or override.is_force_add() or override.is_delete() or name.startswith("hydra"):
                continue
            if name not in root_groups and not (override.package and name in groups):
                keys.append(name)
                continue
            known = options(name)
            chosen = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            for option in chosen:
                if option not in known:
                    raise UserError(f"{name}={option} is not a known {name} config{_did_you_mean(option, known)}; "
                                    f"choose one of {', '.join(known)}")
            group_choices.append(f"{override.get_key_element()}={chosen[0]}")
        if not keys:
            return
        cfg = compose(config_name="train", overrides=search_path + group_choices)
    for key in keys:
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
        if node is None:  # e.g. model.build.x on a model whose build is null: a new subtree, let Hydra decide
            continue
        siblings = list(node.keys()) if isinstance(node, DictConfig) else []
        if leaf not in siblings:  # keys(), unlike `in`, also lists keys whose value is still ??? (required)
            hint = _did_you_mean(leaf, siblings, prefix=f"{parent}." if parent else "")
            raise UserError(f"unknown config key '{key}'{hint}; to add a new key on purpose use +{key}=...")


def parse_overrides(args: list[str]) -> list:
    """The command line's key=value words as Hydra parses them; one that Hydra's grammar cannot read is one line
    naming it (Hydra's own message spans four lines and exits 1)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            parsed += parser.parse_overrides([arg])
        except OverrideParseException as error:
            key = arg.split("=", 1)[0]
            raise UserError(f"cannot read the override {arg!r} ({str(error).splitlines()[0]}): a value holding '=', "
                            f"spaces or brackets needs quotes inside the argument, e.g. \"{key}='...'\"") from None
    return parsed


def check_values(args: list[str]) -> None:
    """A single run's values against their types and ranges (schema.py), then the Trainer settings against Lightning,
    on the config composed from the command line before Hydra starts the job: `seed=abc` or `rag=maybe` is one line
    within a second or two, before the heavy imports, and no run folder is made for it. The job checks them again
    with the components (build_components). Left to the job: a grid (-m), Hydra's flags (--cfg, ...), and anything
    compose itself cannot take."""
    flags = [arg for arg in args if arg.startswith("-")]
    if any(flag not in ("--config-dir", "-cd") and not flag.startswith("--config-dir=") for flag in flags):
        return
    config_dir_values = {value for flag, value in itertools.pairwise(args) if flag in ("--config-dir", "-cd")}
    overrides = [arg for arg in args if "=" in arg and not arg.startswith(("-", "hydra.", "hydra/"))
                 and arg not in config_dir_values]
    sweeps = [override.input_line for override in parse_overrides(overrides) if override.is_sweep_override()]
    if sweeps:
        raise UserError(f"{sweeps[0]} gives several values, which makes a grid of runs: add -m to run one job per "
                        f"value, or quote a value that holds a comma, e.g. \"{sweeps[0].split('=', 1)[0]}='a,b'\"")
    from hydra import compose, initialize_config_dir

    from llmtune.schema import schema_problems

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=_search_path_overrides(args) + overrides)
        # The Trainer's check imports Lightning, which the job imports next anyway.
        problems = schema_problems(cfg) or trainer_problems(cfg.trainer)
    except Exception:  # a syntax error, an interpolation only a job resolves: Hydra's turn, or the job's
        return
    if problems:
        raise UserError("; ".join(problems))


def _search_path_overrides(args: list[str]) -> list[str]:
    """A `--config-dir DIR` (or -cd) run adds DIR to Hydra's search path; the checks compose with it through the
    equivalent hydra.searchpath override (LLMTUNE_CONFIG_PATH's folders come from train.yaml itself)."""
    config_dir = next((value for flag, value in itertools.pairwise(args) if flag in ("--config-dir", "-cd")), None)
    config_dir = next((a.split("=", 1)[1] for a in args if a.startswith("--config-dir=")), config_dir)
    if config_dir is None or not Path(config_dir).is_dir():  # Hydra itself reports a missing one
        return []
    folders = [f"file://{Path(config_dir).resolve()}", *user_search_path()]
    return ["hydra.searchpath=[" + ",".join(f"'{folder}'" for folder in folders) + "]"]


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
