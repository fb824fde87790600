"""Wrap a base model with LoRA adapters; fields are named as PEFT names them."""

from omegaconf import DictConfig, OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model


def lora_settings(model_cfg: DictConfig, method_cfg: DictConfig) -> dict:
    """Model file gives the family's target modules; the method gives r, lora_alpha, lora_dropout (and may override)."""
    # Plain containers: OmegaConf ListConfig breaks LoraConfig's JSON serialisation.
    settings = OmegaConf.to_container(model_cfg.lora, resolve=True)
    settings.update(OmegaConf.to_container(method_cfg.lora, resolve=True))
    return settings


def add_lora(model, model_cfg: DictConfig, method_cfg: DictConfig) -> PeftModel:
    config = LoraConfig(task_type="CAUSAL_LM", **lora_settings(model_cfg, method_cfg))
    return get_peft_model(model, config)
