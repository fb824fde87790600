"""Write a saved Hugging Face causal LM (e.g. a LoRA-merged model) as one GGUF file for llama.cpp.

Tensor names and metadata keys are llama.cpp's (convert_hf_to_gguf.py); transformers' GGUF loader
(`from_pretrained(dir, gguf_file=...)`) undoes exactly what is done here, and is what the tests load back with.
Tensors are converted one at a time from the safetensors files, but the writer holds the converted ones until the
end, so memory peaks at about the size of the output file.
"""

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open

from llmtune.errors import UserError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}
OUTTYPES = ("f32", "f16", "q8_0")
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
Q8_0 = gguf.GGMLQuantizationType.Q8_0
Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[Q8_0][0]  # 32 values per block: rows must be a multiple of it


def write_gguf(model_dir: str | Path, out_file: str | Path, outtype: str = "f16", *,
               tokenizer_gguf: str | Path | None = None, name: str | None = None) -> Path:
    """Write model_dir's weights + tokenizer as one GGUF file; returns out_file.

    tokenizer_gguf: a GGUF whose `tokenizer.*` metadata is copied verbatim (the file the base model came from);
    without it the tokenizer is built from model_dir/tokenizer.json, which must be byte-level BPE.
    """
    model_dir, out_file = Path(model_dir), Path(out_file)
    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    config = _load_config(model_dir)
    arch = _architecture(config)

    # Everything goes to a .partial file renamed at the very end, so an interrupted export never looks finished.
    out_file.parent.mkdir(parents=True, exist_ok=True)
    partial = out_file.with_name(out_file.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    try:
        writer.add_type("model")
        writer.add_name(name or model_dir.name)
        writer.add_file_type(_FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hparams(writer, arch, config)
        # The folder's chat template, if it has one, describes the fine-tuned model: it wins over the GGUF's.
        template = _chat_template(model_dir)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, Path(tokenizer_gguf), config["vocab_size"], skip_chat_template=bool(template))
        else:
            _add_bpe_tokenizer(writer, model_dir, config)
        if template:
            writer.add_chat_template(template)
        for gguf_name, data, raw_dtype in _tensors(model_dir, arch, config, outtype):
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out_file)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    return out_file


def _load_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{model_dir} has no config.json; point the GGUF export at a saved Hugging Face model folder")
    return json.loads(path.read_text(encoding="utf-8"))


def _architecture(config: dict) -> str:
    architectures = config.get("architectures") or ["(none)"]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"GGUF export does not support architecture {architectures[0]}; "
                        f"use a model of {', '.join(SUPPORTED_ARCHITECTURES)}")
    return SUPPORTED_ARCHITECTURES[architectures[0]]


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict, layer_type: str = "full_attention") -> dict:
    """The rope parameters: transformers 5 keeps them in `rope_parameters`, per layer type for Gemma 3."""
    params = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                                **(config.get("rope_scaling") or {})}
    return params.get(layer_type, params)


def _add_hparams(writer: gguf.GGUFWriter, arch: str, config: dict) -> None:
    """The `{arch}.*` keys llama.cpp reads for these architectures (transformers reads a subset of them)."""
    head_dim = _head_dim(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    rope = _rope(config)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "linear":  # Gemma 3 4B+ scales its global layers' rope linearly
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type != "default":
        raise UserError(f"GGUF export does not support rope type {rope_type!r}; export a model with default rope")
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        _check_gemma3_layout(config)
        writer.add_sliding_window(config["sliding_window"])


def _check_gemma3_layout(config: dict) -> None:
    """llama.cpp hard-codes Gemma 3's attention layout (every 6th layer global, local rope base 10000) instead of
    reading it from the file, so refuse a model that differs rather than write one that runs wrongly."""
    layers = config["num_hidden_layers"]
    expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    local_base = _rope(config, "sliding_attention").get("rope_theta", config.get("rope_local_base_freq", 10000.0))
    if config.get("layer_types", expected) != expected or local_base != 10000.0:
        raise UserError("this Gemma 3 model's sliding-window layout differs from the one llama.cpp assumes "
                        "(every 6th layer global, local rope base 10000); it cannot be exported to GGUF")


def _tensors(model_dir: Path, arch: str, config: dict, outtype: str):
    """(gguf name, array, raw dtype) for every weight, renamed, reshaped and typed as llama.cpp stores it."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors weights; save the model with safe_serialization=True")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for hf_name in weights.keys():
                if hf_name.startswith("lm_head.") and config.get("tie_word_embeddings", False):
                    continue  # tied: llama.cpp reuses token_embd, and no output.weight tells loaders it is tied
                gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise UserError(f"GGUF export has no llama.cpp name for tensor {hf_name} in {file.name}; "
                                    "export the plain merged model (no extra heads or modules)")
                data = weights.get_tensor(hf_name).float().numpy()
                if arch == "llama" and ".attn_q." in gguf_name:
                    data = _permute_rope(data, n_head)
                elif arch == "llama" and ".attn_k." in gguf_name:
                    data = _permute_rope(data, n_head_kv)
                elif arch == "gemma3" and gguf_name.endswith("norm.weight"):
                    # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's multiplies by the stored weight. This covers
                    # every norm: attn/post-attn/ffn/post-ffw, q_norm/k_norm and the final norm.
                    data = data + 1.0
                yield gguf_name, *_encode(data, outtype)


def _permute_rope(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF Llama rotates the two halves of each head ([x0..x(d/2-1)], [x(d/2)..]); llama.cpp rotates adjacent pairs
    (x0, x1), (x2, x3)... Interleave each head's rows (or bias entries) so llama.cpp's rope sees the same pairs."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(data: np.ndarray, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """As llama.cpp's converter types them: 1-D tensors (norms, biases) stay F32; matrices become F16, or Q8_0
    where the row splits into whole 32-value blocks (the embeddings too: transformers dequantises them fine)."""
    if outtype == "f32" or data.ndim == 1:
        return data.astype(np.float32), None
    if outtype == "q8_0" and data.shape[-1] % Q8_0_BLOCK == 0:
        return gguf.quants.quantize(data, Q8_0), Q8_0
    return data.astype(np.float16), None


def _copy_tokenizer(writer: gguf.GGUFWriter, path: Path, vocab_size: int, skip_chat_template: bool) -> None:
    """Copy every `tokenizer.*` field of another GGUF verbatim (strings as raw bytes, same value types)."""
    if not path.is_file():
        raise UserError(f"tokenizer GGUF {path} does not exist; pass the GGUF the base model was converted from")
    reader = gguf.GGUFReader(path)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        count = "no" if tokens is None else len(tokens.data)
        raise UserError(f"tokenizer GGUF {path} has {count} tokens but the model has {vocab_size}; "
                        "pass the GGUF the base model was converted from")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or (skip_chat_template and key == gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        vtype, sub_type = field.types[0], field.types[-1]
        if vtype == gguf.GGUFValueType.ARRAY and sub_type == gguf.GGUFValueType.STRING:
            value = [field.parts[i].tobytes() for i in field.data]
        elif vtype == gguf.GGUFValueType.STRING:
            value = field.parts[-1].tobytes()
        else:
            value = field.contents()
        writer.add_key_value(key, value, vtype, sub_type if vtype == gguf.GGUFValueType.ARRAY else None)


def _add_bpe_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: dict) -> None:
    """llama.cpp's "gpt2" tokenizer (byte-level BPE with GPT-2's split regex) from the folder's tokenizer.json."""
    path = model_dir / "tokenizer.json"
    fix = "pass tokenizer_gguf= (the GGUF the base model came from)"
    if not path.is_file():
        raise UserError(f"{model_dir} has no tokenizer.json to build the GGUF tokenizer from; {fix}")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model["type"] != "BPE" or not _is_gpt2_byte_level(pre):
        raise UserError(f"GGUF export can only build a byte-level BPE tokenizer (GPT-2 style) itself; {fix}")

    vocab = dict(model["vocab"]) | {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    size = config["vocab_size"]
    if max(vocab.values()) >= size:
        raise UserError(f"the tokenizer in {model_dir} has ids beyond the model's vocab_size {size}; "
                        "resize the model's embeddings before exporting")
    # Embedding rows with no token (padded vocabularies) get placeholder names, as llama.cpp's converter does.
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for token in spec.get("added_tokens", []):
        types[token["id"]] = gguf.TokenType.CONTROL if token["special"] else gguf.TokenType.USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # llama.cpp's name for GPT-2's split regex; it refuses "gpt2" here
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    special = _special_token_ids(model_dir, config, vocab)
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if special.get(key) is not None:
            add(special[key])
    template = _post_processor_template(spec.get("post_processor"))
    writer.add_add_bos_token(bool(template) and template[0] == _token(special.get("bos"), tokens))
    writer.add_add_eos_token(bool(template) and template[-1] == _token(special.get("eos"), tokens))


def _is_gpt2_byte_level(pre: dict) -> bool:
    """A single ByteLevel pre-tokenizer using its built-in GPT-2 regex and no prefix space: llama.cpp's "gpt-2"."""
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return (len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True)
            and not steps[0].get("add_prefix_space", False))


def _special_token_ids(model_dir: Path, config: dict, vocab: dict) -> dict:
    """bos/eos/unk/pad ids: the tokens tokenizer_config.json names, else the ids config.json gives."""
    path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        token = tok_config.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        ids[key] = vocab.get(token) if token is not None else None
        if ids[key] is None and isinstance(config.get(f"{key}_token_id"), int):
            ids[key] = config[f"{key}_token_id"]
    return ids


def _post_processor_template(processor: dict | None) -> list[str]:
    """The sequence a single text becomes, as names: special tokens by content, the text itself as "$A"."""
    if not processor:
        return []
    if processor.get("type") == "Sequence":
        return next((t for p in processor["processors"] if (t := _post_processor_template(p))), [])
    if processor.get("type") != "TemplateProcessing":
        return []
    return [item["SpecialToken"]["id"] if "SpecialToken" in item else "$A" for item in processor["single"]]


def _token(index: int | None, tokens: list[str]) -> str | None:
    return tokens[index] if index is not None else None


def _chat_template(model_dir: Path) -> str | None:
    """The folder's chat template: chat_template.jinja (transformers 5) or tokenizer_config.json's entry."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    path = model_dir / "tokenizer_config.json"
    template = json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.is_file() else None
    if isinstance(template, list):  # named templates: llama.cpp's single key takes the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template
