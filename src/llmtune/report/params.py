"""A run's config as flat dot keys, which of them vary between runs, and how to show them."""

import json
import math

import pandas as pd

# paths.* says where a run lived, not what it did; hydra.* is Hydra's own bookkeeping; logger.* says where the
# curves went, and its W&B run name embeds the seed, which would split every seed into a config of its own.
IGNORED_TOP_KEYS = ("paths", "hydra", "logger")


def flatten_config(tree: dict, prefix: str = "") -> dict:
    """{"method": {"lora": {"r": 8}}} -> {"method.lora.r": 8}; lists (and empty maps) become one JSON string."""
    flat = {}
    for key, value in tree.items():
        if not prefix and key in IGNORED_TOP_KEYS:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (list, dict)):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def drop_location_values(flat: dict, tree: dict) -> dict:
    """Drop values derived from the run's own folder (logger.save_dir = ${paths.output_dir} once resolved): they
    differ for every run and would show up as a 'varying parameter' that explains nothing."""
    output_dir = (tree.get("paths") or {}).get("output_dir")
    if not isinstance(output_dir, str) or len(output_dir) < 2 or output_dir.startswith("${"):
        return flat
    return {key: value for key, value in flat.items() if not (isinstance(value, str) and output_dir in value)}


def is_numeric(values: pd.Series) -> bool:
    """Numbers, not booleans (rag=true/false is a category)."""
    return pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)


def varying_params(configs: list[dict]) -> list[str]:
    """Config keys whose value differs between runs: categorical ones first (the *.name keys, then rag, ...),
    then numeric ones (method.lora.r, method.optimizer.lr, ...), seed last; config order within each kind."""
    known = [config for config in configs if config]  # a run without any config file says nothing either way
    table = pd.DataFrame(known)
    varying = [key for key in table.columns if table[key].astype(str).nunique(dropna=False) > 1]
    categorical = [key for key in varying if key != "seed" and not is_numeric(table[key])]
    # A choice's name (method.name) before the settings that change with it (method._target_, method.full_finetune):
    # distinct_params keeps the first key of each group, and the name is what a reader recognises.
    categorical.sort(key=lambda key: not key.endswith(".name"))
    numeric = [key for key in varying if key != "seed" and is_numeric(table[key])]
    return categorical + numeric + (["seed"] if "seed" in varying else [])


def distinct_params(table: pd.DataFrame, keys: list[str]) -> tuple[list[str], dict[str, str]]:
    """(keys that split the runs differently from every earlier key, {each other key: the earlier key it follows}).

    model.source.*, model.dtype and model.lora.* change with model.name, and dataset.path with dataset.name: as
    columns, axes or groups they add nothing but width. seed always stays, it is what the groups average over.
    """
    def partition(key):
        return tuple(pd.factorize(table[key].astype(str), use_na_sentinel=False)[0])  # first-appearance codes
    kept, follows = [], {}
    for key in keys:
        twin = next((other for other in kept if partition(other) == partition(key)), None)
        if twin is None or key == "seed":
            kept.append(key)
        else:
            follows[key] = twin
    return kept, follows


def short_names(keys: list[str]) -> dict[str, str]:
    """Readable labels: model.name -> model, method.lora.r -> r; the full key wherever two labels would clash."""
    def short(key):
        parts = key.split(".")
        return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]
    labels = [short(key) for key in keys]
    return {key: label if labels.count(label) == 1 else key for key, label in zip(keys, labels)}


def format_value(value) -> str:
    """One table cell: '-' for missing, 4 significant digits for floats (0.0005, 0.8667), str() otherwise."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe(config: dict, keys: list[str], names: dict[str, str]) -> str:
    """'model=tiny, lr=0.0001' for the given keys of one run (or group)."""
    return ", ".join(f"{names[key]}={format_value(config.get(key))}" for key in keys)
