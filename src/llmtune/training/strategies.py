"""Lightning strategies with the model's own knowledge filled in (conf/trainer/fsdp.yaml)."""

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def decoder_layer_classes(module: torch.nn.Module) -> set[type[torch.nn.Module]]:
    """The layer classes a transformers model names as not to be split across devices (`_no_split_modules`: its
    decoder layers), found in module, at any depth (a PEFT model, inside the LightningModule)."""
    names = {name for sub in module.modules() for name in (getattr(sub, "_no_split_modules", None) or [])}
    return {type(sub) for sub in module.modules() if type(sub).__name__ in names}


class LayerWiseFSDP(FSDPStrategy):
    """FSDPStrategy that makes each decoder layer its own FSDP unit (and, with activation_checkpointing_layers, its
    own checkpointed block) without the config naming a model's layer class: Gemma, Llama and Mistral name theirs in
    transformers (`_no_split_modules`). An explicit auto_wrap_policy wins."""

    def __init__(self, activation_checkpointing_layers: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.activation_checkpointing_layers = activation_checkpointing_layers

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        layers = decoder_layer_classes(model)
        if layers and "auto_wrap_policy" not in self.kwargs:
            self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(layers)
        if layers and self.activation_checkpointing_layers and not self._activation_checkpointing_kwargs:
            self._activation_checkpointing_kwargs = {"auto_wrap_policy": ModuleWrapPolicy(layers)}
        return super()._setup_model(model)
