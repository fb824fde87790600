"""Wrap a base model with LoRA adapters; fields are named as PEFT names them."""

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training


def lora_settings(model_cfg: DictConfig, method_cfg: DictConfig) -> dict:
    """Model file gives the family's target modules; the method gives r, lora_alpha, lora_dropout (and may override)."""
    # Plain containers: OmegaConf ListConfig breaks LoraConfig's JSON serialisation.
    settings = OmegaConf.to_container(model_cfg.lora, resolve=True)
    settings.update(OmegaConf.to_container(method_cfg.lora, resolve=True))
    return settings


def add_lora(model, model_cfg: DictConfig, method_cfg: DictConfig) -> PeftModel:
    if method_cfg.quantization:
        # Casts the few unquantised weights (norms, embeddings) to fp32 for stable training of a 4-bit base;
        # checkpointing only when the method asks for it (it trades time for memory).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=method_cfg.gradient_checkpointing)
        keep_4bit_layout_trainable(model)
    elif method_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input with grad
    config = LoraConfig(task_type="CAUSAL_LM", **lora_settings(model_cfg, method_cfg))
    return get_peft_model(model, config)


def keep_4bit_layout_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a Linear4bit that runs in eval mode without gradients (scoring the base model before
    training does exactly that) repacks its weights for good, and every later matmul, in training too, goes through a
    kernel with no backward: the gradient through the frozen 4-bit weights is silently dropped (Gemma 3 270M on the
    demo data: 0.820 tuned accuracy with the repacked layout). The flag is the one bitsandbytes checks before repacking.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
