"""Find a model's files (model.path, or the model file's source), then load the base model."""

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmtune.errors import UserError
from llmtune.models.sources import model_source


def prepare_model_dir(model_cfg: DictConfig, cache_dir: str | Path, any_source: bool = True) -> str:
    """A local folder (or, when the Hub is reachable, a Hub id) that from_pretrained can load offline: model.path when
    set, else what the model file's source gives (llmtune.models.sources). any_source=False (a config read from a run
    folder) allows only llmtune's own source classes."""
    if model_cfg.path:
        return _checked_local_dir(Path(model_cfg.path))
    # Building or converting a model the first time draws random numbers (weight init); the run's seeded draws that
    # follow (LoRA init) must be the same whether the cache was warm or not.
    with torch.random.fork_rng():
        return model_source(model_cfg, any_source).folder(model_cfg.name, Path(cache_dir) / "models" / model_cfg.name,
                                              model_cfg.dtype)


def _checked_local_dir(path: Path) -> str:
    if not (path / "config.json").is_file():
        raise UserError(f"model.path={path} is not a model folder (no config.json there); "
                        "point it at a folder saved with save_pretrained")
    return str(path)


def as_plain_tensors(model):
    """Drop a quantisation marker (GGUF, bitsandbytes) from a model whose weights are plain tensors again, so
    save_pretrained writes ordinary safetensors that load without a quantiser."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    return model


def attention_implementation(model_cfg: DictConfig) -> dict:
    """model.attn_implementation, or with `auto` (the default) FlashAttention 2 on a CUDA GPU where the flash_attn
    package is installed and the weights are 16-bit: its variable-length kernel is what packed rows
    (trainer.packing: position ids restarting per row) then run through, with no padding and no block mask.
    Elsewhere transformers' own default (SDPA)."""
    choice = model_cfg.get("attn_implementation", "auto")
    if choice != "auto":
        return {"attn_implementation": choice}
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") and model_cfg.dtype != "float32":
        return {"attn_implementation": "flash_attention_2"}
    return {}


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
                                                     use_safetensors=True, **common,
                                                     **attention_implementation(model_cfg))
    except (OSError, ValueError) as error:  # missing files, .bin-only weights, remote code not allowed, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"could not load model '{model_cfg.name}' from {model_dir}: {first_line[:300]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    keep_head_input_contiguous(model)
    return tokenizer, model


def keep_head_input_contiguous(model):
    """Hand the LM head a contiguous input, so that its matmul folds the batch into one [rows, hidden] matrix.

    At generation's prefill transformers gives the head hidden_states[:, -1:, :] (logits_to_keep=1), a [B, 1, H] view
    whose batch stride spans the whole prompt. torch's matmul (2.13 here; pytorch/pytorch#186148) does not fold such
    a view into [B, H] when the weight needs no gradient -- a frozen base under LoRA, or a merged one -- and
    broadcasts the weight to [B, H, V] instead, copying it: for Gemma 3's 262,144 x 640 bf16 head and a batch of 16
    a 5.4 GB copy per generate call (measured on a 2-core CPU: 53 s for that one matmul against 0.09 s folded, and
    generation with an adapter 11x slower than the bare model's, in benchmarks/trl_arms.py). A weight that requires
    grad (a model fresh from from_pretrained) folds anyway, so the bare model never showed it. Copying the [B, 1, H]
    input costs nothing; an input that is already contiguous is passed on as it is. Idempotent.
    """
    head = model.get_output_embeddings()
    if head is None or getattr(head, "_llmtune_contiguous_input", False):
        return model
    head.register_forward_pre_hook(_contiguous_first_input)
    head._llmtune_contiguous_input = True
    return model


def _contiguous_first_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args and isinstance(args[0], torch.Tensor) else None
