"""The types and ranges of a run's settings, in one place, checked on the whole resolved config before any model
loads: a value of the wrong type or out of range is one line naming the key, what it got and what it takes.

Only the keys below are typed; every other key passes through (components check their own arguments against their
signatures: llmtune.config.signature_problems). Values must already have the right type: Hydra reads `seed=abc` as
the string "abc" and `rag=no` as the string "no", and neither is coerced.
"""

import re
from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

ACCELERATORS = Literal["auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu"]
# What the judge's prompt must contain (llmtune.evaluation.judge fills them in).
JUDGE_PLACEHOLDERS = ("{question}", "{reference}", "{answer}")
# Keys whose bad value is not repeated in the error line: what was given there may be the secret itself.
UNECHOED_KEYS = ("eval.judge.api_key_env",)


class _Section(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class LoraSettings(_Section):
    r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)


class OptimizerSettings(_Section):
    lr: float = Field(gt=0)
    weight_decay: float = Field(default=0.0, ge=0)


class SchedulerSettings(_Section):
    warmup_ratio: float = Field(default=0.0, ge=0, le=1)


class MethodSettings(_Section):
    name: str
    full_finetune: bool = False
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    neftune_noise_alpha: float = Field(default=0.0, ge=0)
    gradient_checkpointing: bool = False
    max_length: int = Field(default=512, ge=1)
    lora: LoraSettings | None = None
    optimizer: OptimizerSettings | None = None
    scheduler: SchedulerSettings | None = None


class EarlyStoppingSettings(_Section):
    patience: int | None = Field(default=None, ge=1)


class TrainerSettings(_Section):
    batch_size: int = Field(ge=1)
    length_pool_batches: int = Field(ge=1)
    share_prefix: bool
    max_epochs: int = Field(ge=-1)
    max_steps: int = Field(ge=-1)
    accumulate_grad_batches: int = Field(ge=1)
    gradient_clip_val: float | None = Field(default=None, ge=0)
    log_every_n_steps: int = Field(ge=1)
    accelerator: ACCELERATORS
    devices: int | str | list[int]
    select: Literal["best", "last"] = "best"
    # Lightning's Timer reads "DD:HH:MM:SS" (or a timedelta's keywords, {hours: 1}); "10min" would fail only once
    # training starts.
    max_time: str | dict[str, float] | None = None
    early_stopping: EarlyStoppingSettings
    val_score_rows: int = Field(default=200, ge=1)

    @field_validator("max_time")
    @classmethod
    def _lightning_duration(cls, max_time):
        if isinstance(max_time, str) and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", max_time):
            raise ValueError('must be "DD:HH:MM:SS", e.g. 00:00:10:00 for ten minutes')
        return max_time


class GenerationSettings(_Section):
    max_new_tokens: int = Field(ge=1)
    do_sample: bool
    temperature: float = Field(gt=0)


class JudgePromptSettings(_Section):
    model_config = ConfigDict(strict=True, extra="forbid")
    version: str | int
    system: str
    user: str

    @field_validator("user")
    @classmethod
    def _has_every_placeholder(cls, user: str) -> str:
        missing = [name for name in JUDGE_PLACEHOLDERS if name not in user]
        if missing:
            raise ValueError(f"must contain {', '.join(missing)} (replaced by the row's texts)")
        return user


class JudgeSettings(_Section):
    """eval.judge: an OpenAI-compatible endpoint grading Q&A answers (llmtune.evaluation.judge); off without url.
    A key not listed here is a typo (extra keys forbidden), not a setting passed through."""
    model_config = ConfigDict(strict=True, extra="forbid")
    url: str | None = None
    model: str | None = None
    api_key_env: str
    concurrency: int = Field(ge=1, le=64)
    timeout_s: float = Field(gt=0)
    max_retries: int = Field(ge=0, le=10)
    attempts: int = Field(ge=1, le=10)
    max_rows: int | None = Field(ge=1)
    temperature: float = Field(ge=0, le=2)
    retry_temperature: float = Field(default=0.7, ge=0, le=2)  # runs saved before it existed have none
    max_tokens: int = Field(ge=16)
    usd_per_million_input_tokens: float = Field(ge=0)
    usd_per_million_output_tokens: float = Field(ge=0)
    prompt: JudgePromptSettings

    @field_validator("url")
    @classmethod
    def _is_an_api_base_url(cls, url: str | None) -> str | None:
        if url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError("must be the API's base URL, starting with http:// or https:// "
                             "(e.g. http://127.0.0.1:8000/v1), or null to turn the judge off")
        return url

    @field_validator("api_key_env")
    @classmethod
    def _is_a_variable_name(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError("must name an environment variable (e.g. OPENAI_API_KEY), not hold the key: keys are "
                             "read from the environment only")
        return name


class EvalSettings(_Section):
    baseline: bool
    batch_size: int = Field(ge=1)
    generation: GenerationSettings
    quantize: Literal["int8"] | None = None
    judge: JudgeSettings | None = None  # runs saved before the judge existed have none


class ModelSettings(_Section):
    name: str
    dtype: Literal["bfloat16", "float16", "float32"]
    trust_remote_code: bool


class SplitSettings(_Section):
    column: str | None = None
    names: dict[str, str | None] | None = None
    train_per_class: int | None = Field(default=None, ge=0)
    val_per_class: int | None = Field(default=None, ge=0)
    test_per_class: int | None = Field(default=None, ge=0)
    train_rows: int | None = Field(default=None, ge=1)
    val_rows: int | None = Field(default=None, ge=0)
    test_rows: int | None = Field(default=None, ge=1)


class DatasetSettings(_Section):
    name: str
    duplicates: Literal["drop", "keep"] = "drop"
    labels: list[str | int] | dict[str | int, str] | None = None
    files: dict[Literal["train", "validation", "val", "test"], str | None] | None = None
    text_template: str | None = None
    max_input_tokens: int | None = Field(default=None, ge=1)
    truncation: Literal["head", "tail", "head+tail"] = "head"
    split: SplitSettings | None = None


class RetrieverSettings(_Section):
    k: int = Field(ge=1)
    chunk_size: int = Field(ge=1)
    chunk_overlap: int = Field(ge=0)

    @field_validator("chunk_overlap")
    @classmethod
    def _below_chunk_size(cls, overlap: int, info: ValidationInfo) -> int:
        size = info.data.get("chunk_size")
        if size is not None and overlap >= size:
            raise ValueError(f"must be below retriever.chunk_size={size} (words shared by consecutive chunks)")
        return overlap


class RunSettings(_Section):
    seed: int = Field(ge=0)
    rag: bool
    dataset: DatasetSettings
    model: ModelSettings
    method: MethodSettings
    trainer: TrainerSettings
    eval: EvalSettings
    retriever: RetrieverSettings


def schema_problems(cfg: DictConfig) -> list[str]:
    """One line per bad value: `key=value: what it takes`."""
    values = {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg.get(key), DictConfig)
              else cfg.get(key) for key in RunSettings.model_fields}
    try:
        RunSettings.model_validate(values)
    except ValidationError as error:
        lines = [_describe(problem) for problem in error.errors()]
        return list(dict.fromkeys(line for line in lines if line))  # a union type fails once per member
    return []


def _describe(problem: dict) -> str:
    """`trainer.max_epochs='abc' must be a valid integer`; the union member pydantic tried is left out of the key."""
    key = ".".join(str(part) for part in problem["loc"] if not _is_type_tag(part))
    if key in UNECHOED_KEYS:
        return f"{key} {problem['msg'].replace('Value error, ', '')}"
    if problem["type"] == "extra_forbidden":
        section = key.rpartition(".")[0]
        return f"{key} is not a setting of {section}; remove it (a typo of another {section} key?)"
    if problem["type"] == "missing":
        return f"{key} is missing: set {key}=..."
    if problem["type"].startswith("bool"):
        return f"{key}={problem.get('input')!r} must be true or false"
    message = problem["msg"].replace("Input should be", "must be").replace("Value error, ", "")
    return f"{key}={problem.get('input')!r} {message}"


def _is_type_tag(part) -> bool:
    return isinstance(part, str) and (part in ("int", "float", "str", "bool", "none") or part.startswith(
        ("list[", "function-", "literal[")))
