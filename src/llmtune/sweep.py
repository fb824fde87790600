"""`llmtune sweep SPEC --count N`: run a W&B sweep spec (sweeps/*.yaml) on this machine, one process per trial.

The same spec runs online with `wandb sweep` + `wandb agent`. Offline, Optuna proposes the trials: W&B's own engine
(the `sweeps` package) pins numpy<2, which conflicts with this stack (numpy 2.x). W&B's methods map to Optuna as
grid -> every combination of the `values`, enqueued in order; random -> RandomSampler(seed); bayes ->
TPESampler(seed) (a tree-structured Parzen estimator, where W&B fits a Gaussian process: both model the finished
trials to propose the next). Optuna's GridSampler is not used: it calls `study.stop()` after the last grid point,
which raises a RuntimeError outside `study.optimize`, i.e. with the ask/tell loop used here.

Each trial is `python -m llmtune <spec's fixed args> <trial params> <your overrides> hydra.run.dir=<trial dir>`; its
result is read back from the run directory (status.json, and the metric under "logged" in metrics.json).

With `--storage URL` (run_worker) the study lives in a database (Optuna's RDB storage) and any number of processes
running the same command, on one machine or many, share it: each takes the next trial until the study has --count
(a grid: until no enqueued point is left). How they avoid running a trial twice: sweep_storage.py.
"""

import itertools
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from llmtune.cli import option, parse, positional, rest
from llmtune.config import check_overrides
from llmtune.errors import UserError
from llmtune.files import write_atomic
from llmtune.report.params import short_names
from llmtune.tracking import FINAL_METRICS

METHODS = ("grid", "random", "bayes")
GOALS = ("maximize", "minimize")  # W&B's words, and Optuna's study directions too
# Top-level spec keys this runner reads or may safely ignore (name, description, project, entity, program).
SPEC_KEYS = {"name", "description", "project", "entity", "program", "command", "method", "metric", "parameters"}
# W&B distribution -> the keys it takes besides `distribution` (from W&B's sweep config schema; `q` defaults to 1).
DISTRIBUTIONS = {
    "constant": {"value"},
    "categorical": {"values"},
    "int_uniform": {"min", "max"},
    "uniform": {"min", "max"},
    "q_uniform": {"min", "max", "q"},
    "log_uniform_values": {"min", "max"},
    "q_log_uniform_values": {"min", "max", "q"},
}
SUPPORTED = ("`value`, `values`, or `distribution` uniform, log_uniform_values, int_uniform, q_uniform, "
             "q_log_uniform_values or categorical with `min`/`max` (and `q`)")
SPEC_EXAMPLE = "sweeps/lora_grid.yaml"


@dataclass(frozen=True)
class Parameter:
    """One swept config key: a constant, or an Optuna distribution (rounded to a multiple of `q` after sampling)."""

    name: str
    value: Any = None
    distribution: BaseDistribution | None = None
    q: int | float | None = None

    def pick(self, sampled: dict[str, Any]) -> Any:
        if self.distribution is None:
            return self.value
        value = sampled[self.name]
        if self.q is not None:  # W&B's q_ distributions: round(x / q) * q, an int when q is an int
            value = round(value / self.q) * self.q
            value = int(value) if isinstance(self.q, int) else round(value, 12)  # 12 digits: drop 0.30000000000000004
        return value


@dataclass(frozen=True)
class SweepSpec:
    path: Path
    raw: dict
    method: str
    metric: str
    goal: str
    parameters: list[Parameter]
    fixed_args: list[str]  # from the spec's `command`, e.g. logger=wandb

    @property
    def swept(self) -> dict[str, BaseDistribution]:
        return {p.name: p.distribution for p in self.parameters if p.distribution is not None}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the categorical choices, in order (the first parameter varies slowest)."""
        choices = {name: distribution.choices for name, distribution in self.swept.items()}
        return [dict(zip(choices, combination)) for combination in itertools.product(*choices.values())]


# --- The spec -------------------------------------------------------------------------------------------------------

def load_spec(path: Path) -> SweepSpec:
    """Read and check a W&B sweep spec; every problem is a UserError naming the fix."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"sweep spec {path} not found; pass a spec file such as {SPEC_EXAMPLE}") from None
    except IsADirectoryError:
        raise UserError(f"sweep spec {path} is a folder; pass a spec file such as {SPEC_EXAMPLE}") from None
    except OSError as error:  # e.g. no permission to read it
        raise UserError(f"cannot read sweep spec {path} ({error.strerror}); pass a readable spec file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"sweep spec {path} is not UTF-8 text (byte {error.start}); pass a YAML spec such as "
                        f"{SPEC_EXAMPLE}") from None
    except yaml.YAMLError as error:
        raise UserError(f"sweep spec {path} is not valid YAML ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"sweep spec {path} is not a YAML mapping with method, metric and parameters; "
                        f"see {SPEC_EXAMPLE}")
    unknown = sorted(set(raw) - SPEC_KEYS)
    if unknown:
        raise UserError(f"sweep spec {path}: {', '.join(unknown)} is not supported by llmtune sweep (it reads "
                        f"{', '.join(sorted(SPEC_KEYS))}); remove it, or run the spec online with wandb agent")
    method = raw.get("method")
    if method not in METHODS:
        raise UserError(f"sweep spec {path}: method {method!r} is not supported; use one of {', '.join(METHODS)}")
    metric, goal = _metric(path, raw.get("metric"))
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"sweep spec {path}: `parameters` is missing or empty; map config keys such as "
                        f"method.lora.r to `values: [8, 16]`")
    parsed = [parse_parameter(str(name), spec) for name, spec in parameters.items()]
    for parameter in parsed:
        if method == "grid" and parameter.distribution is not None \
                and not isinstance(parameter.distribution, CategoricalDistribution):
            raise UserError(f"sweep spec {path}: parameter {parameter.name} has a distribution, but a grid needs "
                            f"`values` or `value` for every parameter; list its values or use method: random/bayes")
    return SweepSpec(path, raw, method, metric, goal, parsed, fixed_args(path, raw.get("command")))


def _metric(path: Path, metric: Any) -> tuple[str, str]:
    names = ", ".join(FINAL_METRICS)
    if not isinstance(metric, dict) or not metric.get("name"):
        raise UserError(f"sweep spec {path}: metric.name is missing; set metric: {{name: val/accuracy, "
                        f"goal: maximize}} (one of {names})")
    extra = sorted(set(metric) - {"name", "goal"})  # e.g. target: W&B stops the sweep there; not supported here
    if extra:
        raise UserError(f"sweep spec {path}: metric.{', metric.'.join(extra)} is not supported by llmtune sweep; "
                        f"keep only metric.name and metric.goal")
    if metric["name"] not in FINAL_METRICS:
        raise UserError(f"sweep spec {path}: metric.name={metric['name']} is not a metric llmtune logs at the end "
                        f"of a run; choose one of {names} (val/ ones: tuning on test would flatter the test score)")
    if metric.get("goal") not in GOALS:  # W&B would default to minimize, which is wrong for accuracy: be explicit
        raise UserError(f"sweep spec {path}: metric.goal={metric.get('goal')!r}; set it to maximize or minimize")
    return metric["name"], metric["goal"]


def parse_parameter(name: str, spec: Any) -> Parameter:
    """A W&B parameter block -> a constant or an Optuna distribution, with W&B's inference when no distribution."""
    if not isinstance(spec, dict) or "parameters" in spec:
        raise UserError(f"parameter {name}: nested parameters are not supported by llmtune sweep; give each config "
                        f"key its dotted name (method.lora.r) and {SUPPORTED}")
    kind = spec.get("distribution") or _inferred_distribution(spec)
    if kind not in DISTRIBUTIONS:
        raise UserError(f"parameter {name}: distribution {kind!r} is not supported by llmtune sweep; use {SUPPORTED}")
    allowed = DISTRIBUTIONS[kind]
    extra, missing = set(spec) - allowed - {"distribution"}, allowed - {"q"} - set(spec)
    if extra or missing:
        problem = f"{', '.join(sorted(extra))} not allowed" if extra else f"needs {', '.join(sorted(missing))}"
        raise UserError(f"parameter {name}: distribution {kind} {problem}; it takes {', '.join(sorted(allowed))}")
    if kind == "constant":
        return Parameter(name, value=spec["value"])
    if kind == "categorical":
        values = spec["values"]
        if not isinstance(values, list) or not values or not all(_is_scalar(v) for v in values):
            raise UserError(f"parameter {name}: `values` must be a non-empty list of numbers, strings, booleans or "
                            f"null (Optuna's categorical choices); got {values!r}")
        return Parameter(name, distribution=CategoricalDistribution(values))
    low, high = _number(name, spec, "min"), _number(name, spec, "max")
    q = _number(name, spec, "q") if "q" in spec else (1.0 if kind.startswith("q_") else None)
    if q is not None and q <= 0:
        raise UserError(f"parameter {name}: q={q} must be above 0")
    try:
        if kind == "int_uniform":
            if not (isinstance(low, int) and isinstance(high, int)):
                raise ValueError(f"int_uniform needs integer min and max, got {low!r} and {high!r}")
            distribution = IntDistribution(low, high)
        else:  # uniform and log_uniform_values, each with or without q
            distribution = FloatDistribution(low, high, log="log_uniform" in kind)
    except ValueError as error:
        raise UserError(f"parameter {name}: {error}") from None
    return Parameter(name, distribution=distribution, q=q)


def _inferred_distribution(spec: dict) -> str | None:
    """W&B's rule: value -> constant, values -> categorical, integer min/max -> int_uniform, other min/max -> uniform."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        integers = all(isinstance(spec[k], int) and not isinstance(spec[k], bool) for k in ("min", "max"))
        return "int_uniform" if integers else "uniform"
    return None


def _number(name: str, spec: dict, key: str) -> int | float:
    value = spec[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"parameter {name}: {key}={value!r} is not a number (YAML 1.1 reads 1e-4 as a string: "
                        f"write 1.0e-4)")
    return value


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def fixed_args(path: Path, command: Any) -> list[str]:
    """The spec's own arguments to every trial: `command` after `llmtune`, without W&B's ${...} macros."""
    if command is None:
        return []
    command = [str(part) for part in command] if isinstance(command, list) else None
    if command is None or "llmtune" not in command or "${args_no_hyphens}" not in command:
        raise UserError(f"sweep spec {path}: command must run llmtune with Hydra-style arguments, e.g. "
                        f"[${{env}}, ${{interpreter}}, -m, llmtune, ${{args_no_hyphens}}] (W&B's ${{args}} "
                        f"passes --key=value, which Hydra rejects)")
    after_program = command[command.index("llmtune") + 1:]
    return [part for part in after_program if not part.startswith("${")]


# --- Hydra arguments ------------------------------------------------------------------------------------------------

def hydra_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back unchanged: strings Hydra would retype or split are quoted."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # repr(1e-05) == '1e-05', which Hydra reads as a float
    if isinstance(value, list):  # a constant may be any YAML value (W&B's `value`)
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[A-Za-z_][\w./-]*", text) and text.lower() not in ("true", "false", "null", "nan", "inf"):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def as_overrides(params: dict[str, Any]) -> list[str]:
    return [f"{name}={hydra_value(value)}" for name, value in params.items()]


def merge_overrides(*groups: list[str]) -> list[str]:
    """One override per key, later groups winning: `llmtune sweep spec logger=csv` replaces the spec's logger=wandb."""
    merged: dict[str, str] = {}
    for override in itertools.chain(*groups):
        merged[override.split("=", 1)[0]] = override
    return list(merged.values())


def check_keys(spec: SweepSpec, overrides: list[str]) -> None:
    """Every key is a real config key, and every group option exists, before any trial starts."""
    reserved = set(spec.swept) | {"hydra.run.dir"}
    for override in overrides:
        if override.split("=", 1)[0] in reserved:
            raise UserError(f"{override} conflicts with the sweep (the spec sweeps this key, or --dir sets the run "
                            f"directory); drop it")
    # One representative trial; a categorical group key as a Hydra sweep (a,b,c) so every option is checked.
    probe = {p.name: p.value for p in spec.parameters if p.distribution is None}
    probe_args = as_overrides(probe)
    for name, distribution in spec.swept.items():
        if isinstance(distribution, CategoricalDistribution):
            probe_args.append(f"{name}={','.join(hydra_value(c) for c in distribution.choices)}")
        else:
            probe_args.append(f"{name}={hydra_value(distribution.low)}")
    check_overrides(merge_overrides(spec.fixed_args, probe_args, overrides))


# --- Trials ---------------------------------------------------------------------------------------------------------

def launch_llmtune(args: list[str]) -> int:
    """One trial in a fresh process (a crash or leaked memory ends with it); its output streams to the console."""
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "llmtune", *args], check=False).returncode


def read_result(trial_dir: Path, returncode: int, metric: str) -> tuple[float | None, str | None]:
    """(the trial's metric, None), or (None, why there is none): the trial then counts as failed."""
    status = _json_or_empty(trial_dir / "status.json")
    state = status.get("status", "missing (no status.json)")
    if returncode != 0 or state != "completed":
        reason = status.get("error") or f"status {state}"
        return None, f"exit code {returncode}: {reason}" if returncode else reason
    logged = _json_or_empty(trial_dir / "metrics.json").get("logged") or {}
    value = logged.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"metrics.json logs no finite {metric} (logged: {', '.join(logged) or 'nothing'})"
    return float(value), None


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def trial_dir_name(number: int, params: dict[str, Any], width: int = 2) -> str:
    """`00_r=8_lora_alpha=16_lr=0.0001`: the trial's number, then its swept values, safe as a folder name."""
    short = short_names(list(params))
    name = "_".join([f"{number:0{width}d}", *(f"{short[k]}={short_value(v)}" for k, v in params.items())])
    return re.sub(r"[^\w.=+-]", "-", name)[:120]


def short_value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def make_sampler(method: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if method == "bayes":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # random, and grid, whose trials are all enqueued


def engine_name(method: str) -> str:
    engine = {"grid": "grid (every combination, enqueued in order)", "random": "RandomSampler", "bayes": "TPESampler"}
    return f"optuna {optuna.__version__} {engine[method]}"


def trial_params(spec: SweepSpec, trial: optuna.trial.Trial) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every parameter of the trial (constants too, `q` applied), and the swept ones alone."""
    params = {p.name: p.pick(trial.params) for p in spec.parameters}
    return params, {name: params[name] for name in spec.swept}


def run_trial(spec: SweepSpec, params: dict[str, Any], trial_dir: Path, overrides: list[str],
              launch: Callable[[list[str]], int]) -> tuple[float | None, str | None, float]:
    """Run one trial in `trial_dir`: (its metric or None, why it failed or None, seconds)."""
    args = merge_overrides(spec.fixed_args, as_overrides(params), overrides)
    started = time.perf_counter()
    returncode = launch([*args, f"hydra.run.dir={hydra_value(str(trial_dir))}"])
    value, error = read_result(trial_dir, returncode, spec.metric)
    return value, error, round(time.perf_counter() - started, 1)


def run_sweep(spec: SweepSpec, count: int, sweep_dir: Path, overrides: list[str], seed: int,
              launch: Callable[[list[str]], int], console: Console | None = None, earlier: dict | None = None) -> dict:
    """Ask Optuna for `count` trials one after another, run each, tell it the metric; sweep.json after each.

    `launch` runs one trial from its Hydra overrides and returns the exit code (launch_llmtune; tests pass a fake).
    `earlier`: an interrupted sweep's sweep.json; its finished trials are told to the study, not run again, and the
    sweep goes on to `count` trials in all.
    """
    console = console or Console()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines report each trial
    study = optuna.create_study(direction=spec.goal, sampler=make_sampler(spec.method, seed))
    done = (earlier or {}).get("trials", [])
    for finished in done:  # the sampler learns from them as if it had run them
        study.add_trial(optuna.trial.create_trial(
            params=finished["sampled"], distributions=spec.swept,
            value=finished["value"] if finished["status"] == "completed" else None,
            state=TrialState.COMPLETE if finished["status"] == "completed" else TrialState.FAIL))
    if spec.method == "grid":
        for point in spec.grid()[len(done):]:
            study.enqueue_trial(point)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = new_record(spec, seed, overrides, count) | {"trials": list(done), "best": _best(list(done), spec.goal)}
    width = max(2, len(str(count - 1)))
    for number in range(len(done), count):
        trial = study.ask(spec.swept)
        params, swept = trial_params(spec, trial)
        trial_dir = (sweep_dir / trial_dir_name(number, swept, width)).resolve()
        _say(console, f"trial {number} ({number + 1}/{count}): {' '.join(as_overrides(swept))}", style="bold")
        value, error, seconds = run_trial(spec, params, trial_dir, overrides, launch)
        if error is None:
            study.tell(trial, value)
        else:
            study.tell(trial, state=TrialState.FAIL)
            _say(console, f"trial {number} ({number + 1}/{count}) failed: {error}", style="red")
        record["trials"].append({
            "number": number, "params": params, "sampled": trial.params, "dir": trial_dir.name,
            "status": "completed" if error is None else "failed", "value": value, "error": error,
            "seconds": seconds})
        record["best"] = _best(record["trials"], spec.goal)
        write_atomic(sweep_dir / "sweep.json", json.dumps(record, indent=2) + "\n")
    return record


def new_record(spec: SweepSpec, seed: int, overrides: list[str], count: int) -> dict:
    """sweep.json's head: what was swept, how, and with which overrides (the trials follow)."""
    return {"spec": spec.raw, "spec_path": str(spec.path), "engine": engine_name(spec.method), "seed": seed,
            "method": spec.method, "metric": {"name": spec.metric, "goal": spec.goal}, "overrides": overrides,
            "count": count}


# --- Workers sharing a study (--storage) ----------------------------------------------------------------------------

def run_worker(spec: SweepSpec, count: int, args: "SweepArgs", default_dir: Path, launch: Callable[[list[str]], int],
               console: Console) -> tuple[dict, Path]:
    """One of several processes running the same sweep from one Optuna study in `args.storage`: it takes trials
    until the study has `count` (a grid: until no point is left), then returns the whole study's record."""
    from llmtune import sweep_storage as shared  # SQLAlchemy and the database driver only when asked for

    if args.resume:
        raise UserError("--resume is for a sweep without --storage; a stored study goes on when a worker runs the "
                        "same command again: drop --resume")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = spec.method == "grid"
    storage = shared.open_storage(args.storage, retry_lost_trials=grid)
    name = args.study or default_study_name(spec)
    identity = {"spec": spec.raw, "overrides": list(args.overrides), "seed": args.search_seed, "count": count}

    def enqueue_grid(study: optuna.Study) -> None:
        for point in spec.grid()[:count]:
            study.enqueue_trial(point)

    # The first worker samples with --seed; the others with seeds of their own, or they would propose its points.
    study, sweep_dir = shared.create_or_join(
        storage, name, spec.goal, identity, args.dir, default_dir,
        sampler=lambda created: make_sampler(spec.method, args.search_seed if created else None),
        enqueue=enqueue_grid if grid else lambda study: None)
    _say(console, f"worker {shared.WORKER}: study {name} in {shared.masked(args.storage)}, trials in {sweep_dir}")

    def build_record() -> dict:
        trials = shared.stored_trials(study)
        return new_record(spec, args.search_seed, list(args.overrides), count) | {
            "storage": shared.masked(args.storage), "study": name, "trials": trials,
            "best": _best(trials, spec.goal)}

    width = max(2, len(str(count - 1)))
    while True:
        trial = (shared.next_queued_trial(study, spec.swept) if grid
                 else shared.next_sampled_trial(study, spec.swept, count))
        if trial is None:
            break
        params, swept = trial_params(spec, trial)
        trial_dir = (sweep_dir / trial_dir_name(trial.number, swept, width)).resolve()
        for key, value in {"params": params, "dir": trial_dir.name, "worker": shared.WORKER}.items():
            trial.set_user_attr(key, value)
        _say(console, f"trial {trial.number} (study {name}): {' '.join(as_overrides(swept))}", style="bold")
        try:
            with shared.heartbeat(study, trial):
                value, error, seconds = run_trial(spec, params, trial_dir, list(args.overrides), launch)
        except BaseException as stop:  # Ctrl-C or a crash of this worker: the trial is not left running
            shared.give_back(study, trial, requeue=grid, reason=f"its worker stopped ({type(stop).__name__})")
            raise
        trial.set_user_attr("seconds", seconds)
        if error is None:
            study.tell(trial, value)
        else:
            trial.set_user_attr("error", error)
            study.tell(trial, state=TrialState.FAIL)
            _say(console, f"trial {trial.number} failed: {error}", style="red")
        shared.write_record(sweep_dir, build_record)
    return shared.write_record(sweep_dir, build_record), sweep_dir


def default_study_name(spec: SweepSpec) -> str:
    return str(spec.raw.get("name") or spec.path.stem)


def _best(trials: list[dict], goal: str) -> int | None:
    completed = [t for t in trials if t["status"] == "completed"]
    if not completed:
        return None
    pick = max if goal == "maximize" else min
    return pick(completed, key=lambda t: t["value"])["number"]


def ranked(trials: list[dict], goal: str) -> list[dict]:
    """Completed trials best first, then the failed ones in the order they ran."""
    sign = -1 if goal == "maximize" else 1
    return sorted(trials, key=lambda t: (t["status"] != "completed", sign * (t["value"] or 0), t["number"]))


def print_sweep_table(record: dict, spec: SweepSpec, sweep_dir: Path, console: Console) -> None:
    table = Table(title=f"{spec.raw.get('name') or spec.path.stem}: {spec.metric} ({spec.goal})")
    for column in ["#", *short_names(list(spec.swept)).values(), spec.metric, "status", "s"]:
        table.add_column(column, justify="left" if column == "status" else "right")
    for trial in ranked(record["trials"], spec.goal):
        values = [short_value(trial["params"][name]) for name in spec.swept]
        status = trial["status"] if trial["error"] is None else f"failed: {trial['error'][:60]}"
        value = "-" if trial["value"] is None else f"{trial['value']:.4f}"
        seconds = "-" if trial["seconds"] is None else f"{trial['seconds']:.0f}"  # None: still running elsewhere
        table.add_row(str(trial["number"]), *values, value, status, seconds)
    console.print(table)
    running = running_trials(record)
    if record["best"] is None and running:
        _say(console, f"no trial has completed yet; {running} still running on other workers")
    elif record["best"] is None:
        _say(console, f"all {len(record['trials'])} trials failed; see {sweep_dir / 'sweep.json'}")
    else:
        best = next(t for t in record["trials"] if t["number"] == record["best"])
        _say(console, f"best: trial {best['number']} {spec.metric}={best['value']:.4f} "
                      f"{' '.join(as_overrides({n: best['params'][n] for n in spec.swept}))}  ({best['dir']})")
    if running:
        _say(console, f"{running} trial(s) still running on other workers; sweep.json is rewritten as each ends")
    _say(console, f"all trials in one report: llmtune report {sweep_dir}")


def running_trials(record: dict) -> int:
    return sum(trial["status"] == "running" for trial in record["trials"])


def _say(console: Console, text: str, style: str | None = None) -> None:
    """One plain line: no rich markup in overrides like `[a,b]`, no wrapping inside a path to copy."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


# --- Command line ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepArgs:
    """Run a W&B sweep spec on this machine, one run per trial (Optuna proposes the trials).

    example: llmtune sweep sweeps/lora_grid.yaml count=2 model=tiny trainer.max_epochs=1 logger=csv
    workers: the same command with storage=sqlite:///sweep.db in several shells (or on several machines with
    storage=postgresql://USER@HOST:PORT/DB) runs each trial once. A worker killed mid-trial stops sending
    heartbeats; 3 minutes later the next worker to look for a trial marks it failed, and a grid re-queues the point"""

    spec: Path = positional(f"a W&B sweep spec, e.g. {SPEC_EXAMPLE}", metavar="SPEC")
    count: int | None = option(None, "trials to run", minimum=1,
                               default_text="a grid's size, which also caps it; random and bayes: required")
    dir: Path | None = option(None, "the sweep's folder", metavar="DIR",
                              default_text="outputs/sweeps/<date>/<time>_<spec>; with storage=URL, the folder "
                                           "of the study's first worker")
    # `seed=N` stays a Hydra override (the runs' own seed), so the search's seed has its own name; --seed as before.
    search_seed: int = option(42, "the search's seed, for Optuna's sampler; --seed N too (seed=N is an override: "
                                  "the runs' own seed)", flags=("--seed",))
    resume: bool = option(False, "continue the interrupted sweep in dir=DIR: its finished trials are not run again")
    storage: str | None = option(
        None, "a database in which several workers running this same command share one study and run each trial "
              "once: sqlite:///PATH/study.db on one machine (never on a network filesystem: its locks are not "
              "reliable there), postgresql://USER@HOST:PORT/DB for a cluster; --count is then the study's total",
        metavar="URL", default_text="none: one process, the study in memory")
    study: str | None = option(None, "the study's name in --storage", metavar="NAME",
                               default_text="the spec's `name`, else its file name")
    overrides: list[str] = rest("Hydra overrides for every trial, e.g. model=tiny logger=csv seed=1",
                                metavar="OVERRIDE")


def main(argv: list[str]) -> None:
    args = parse(SweepArgs, argv, "sweep")
    if args.study is not None and args.storage is None:
        raise UserError("--study names a study in a database: add --storage URL (e.g. sqlite:///sweeps.db)")
    spec = load_spec(args.spec)
    count = _count(spec, args.count)
    check_keys(spec, args.overrides)
    now = datetime.now()
    default_dir = Path("outputs/sweeps") / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{spec.path.stem}"
    console = Console()
    if args.storage is not None:
        record, sweep_dir = run_worker(spec, count, args, default_dir, launch_llmtune, console)
    else:
        sweep_dir = args.dir or default_dir
        earlier = earlier_sweep(args.dir, spec, args) if args.resume else None
        if earlier is None and (sweep_dir / "sweep.json").exists():
            raise UserError(f"{sweep_dir} already holds a sweep (sweep.json): choose another --dir, or add --resume "
                            "to continue it")
        record = run_sweep(spec, count, sweep_dir, args.overrides, args.search_seed, launch_llmtune, console, earlier)
    print_sweep_table(record, spec, sweep_dir, console)
    if record["best"] is None and not running_trials(record):
        sys.exit(1)


def earlier_sweep(sweep_dir: Path | None, spec: SweepSpec, args: SweepArgs) -> dict:
    """The interrupted sweep's record, checked to be the same sweep (spec, overrides, search seed)."""
    if sweep_dir is None or not (sweep_dir / "sweep.json").is_file():
        raise UserError("--resume needs dir=DIR naming the folder of the sweep to continue (one with sweep.json)")
    record = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))
    if "storage" in record:
        raise UserError(f"{sweep_dir}'s trials are in study {record['study']} of {record['storage']}: run a worker "
                        f"with --storage URL (same command, without --resume) to go on with it")
    if (record["spec"], record["overrides"], record["seed"]) != (spec.raw, list(args.overrides), args.search_seed):
        raise UserError(f"{sweep_dir} holds another sweep (its spec, overrides or seed differ): resume it with "
                        f"the same command, or start a new one in another dir")
    if any("sampled" not in trial for trial in record["trials"]):
        raise UserError(f"{sweep_dir}'s sweep.json predates --resume (no sampled values): start a new sweep")
    return record


def _count(spec: SweepSpec, count: int | None) -> int:
    if spec.method == "grid":
        size = len(spec.grid())
        if count is not None and count > size:
            print(f"llmtune sweep: --count {count} capped to the grid's {size} combinations")
        count = size if count is None else min(count, size)
    elif count is None:
        raise UserError(f"method: {spec.method} needs --count N (how many trials to run); only a grid has a size")
    if count < 1:
        raise UserError(f"--count {count} must be at least 1")
    return count


if __name__ == "__main__":
    from llmtune.errors import report_user_errors

    report_user_errors(main)(sys.argv[1:])
