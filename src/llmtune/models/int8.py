"""int8 scoring: the decoder's linear layers as int8 x int8 -> int32 matmuls, for label scoring and predict only.

The kernel is torch's own `torch._int_mm`, which on x86 runs oneDNN's int8 GEMM (AVX-512 VNNI, AMX where present):
about twice the bf16 matmul rate on an AVX-512 VNNI CPU. Weights are quantised once, symmetric per output channel;
activations at every call, symmetric per token (row), so one large token never coarsens the others:

    y = (x_int8 @ W_int8^T) * x_scale[token] * w_scale[channel]

Only the nn.Linear layers inside the decoder are replaced. The embeddings and the LM head stay as they are: Gemma ties
them, and label scoring swaps the head for a few-row one (llmtune.models.logits.vocabulary_subset) that must keep
reading the original weights. The result has no backward and no parameters in its linear layers, so it is for
inference; training never calls this.

What it buys and costs (Gemma 3 270M, Financial PhraseBank, 2-core AVX-512 VNNI CPU without AMX; the record and the
other candidates: benchmarks/int8_candidates.py): label scoring ~1.16-1.27x the bf16 rate, not the kernel's ~2x,
because the per-token quantise and dequantise passes run as separate eager ops; labels agree with bf16 on 98.0% of
900 test sentences for a tuned model and 96.0% for the untuned base, short of 99.5%. Even int8 weights alone
(activations left in bf16) reach only 99.2-99.4% there: the rows that flip are near ties (benchmarks/README.md).
"""

import weakref

import torch
from torch import nn

from llmtune.errors import UserError

__all__ = ["Int8Linear", "quantize_linears_int8"]

INT8_MAX = 127


def quantize_linears_int8(model):
    """Replace every nn.Linear in the model's decoder layers with an int8 one, in place, and return the model.

    A PeftModel is merged first (merge_and_unload): the adapter is folded into the bf16 weights, which are then
    quantised, so the LoRA path costs nothing at inference. Use the returned model: for a PeftModel it is the merged
    base model, not the wrapper. Raises UserError when the model is not on the CPU, torch has no int8 matmul here, or
    the decoder has no nn.Linear layers to quantise.
    """
    model = _merged(model)
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise UserError(f"quantize=int8 runs on the CPU only (the model is on {device}); leave quantize unset")
    _check_int8_matmul()
    decoder = model.get_decoder()
    replaced = 0
    for parent in list(decoder.modules()):
        # Linears under one parent that read the same tensor (q/k/v, gate/up) quantise it once between them.
        shared_input = _QuantizedInput()
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:  # exact type: LoRA wrappers and already-quantised layers are left alone
                setattr(parent, name, Int8Linear(child, shared_input))
                replaced += 1
    if not replaced:
        raise UserError(f"quantize=int8 found no nn.Linear layers in {type(model).__name__}'s decoder to quantise; "
                        "leave quantize unset for this model")
    return model


def _merged(model):
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def _check_int8_matmul() -> None:
    """Run the kernel once on a small product, so a torch without it fails here with one line, not mid-scoring."""
    if not torch.backends.mkldnn.is_available():  # without oneDNN, torch._int_mm is a slow reference loop
        raise UserError("quantize=int8 needs a torch build with oneDNN (torch.backends.mkldnn), which this one lacks; "
                        "leave quantize unset")
    ones = torch.ones((32, 64), dtype=torch.int8)
    try:
        product = torch._int_mm(ones, ones.T.contiguous())
    except (AttributeError, RuntimeError, NotImplementedError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise UserError(f"quantize=int8 needs torch's int8 matmul (torch._int_mm) on this CPU, which failed: "
                        f"{first_line}; leave quantize unset") from None
    if not bool((product == 64).all()):
        raise UserError("quantize=int8: torch's int8 matmul (torch._int_mm) gave a wrong product on this CPU; "
                        "leave quantize unset")


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row) with rows ~= values * scale, symmetric, for a [M, K] tensor.

    The ops are chosen for eager speed on the CPU (each one is a full pass over the activations): the row maximum is
    taken in the input's own dtype (abs + amax, the exact maximum, far faster here than linalg.vector_norm), and the
    division writes a new fp32 tensor, which rounds in place and narrows to int8 (bf16 arithmetic would round the
    scaled values to a multiple of 0.5 above 64 before they are rounded to integers).
    """
    scale = rows.abs().amax(dim=1, keepdim=True).float().div_(INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.div(rows, scale).round_().to(torch.int8), scale


class _QuantizedInput:
    """The last input of a group of sibling linears and its quantised form: q_proj, k_proj and v_proj (and gate_proj
    and up_proj) are called one after the other on the same tensor, and quantising it costs a third of a small
    linear's int8 matmul. The input is held by weak reference (the cache never keeps an activation alive) and checked
    by identity and version (an in-place change in between means quantising again)."""

    def __init__(self):
        self._source, self._version, self._value = None, None, None

    def get(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._source is None or self._source() is not x or self._version != x._version:
            self._value = _quantize_rows(x.reshape(-1, x.shape[-1]))
            self._source, self._version = weakref.ref(x), x._version
        return self._value


class Int8Linear(nn.Module):
    """An inference-only stand-in for an nn.Linear: int8 weights (per output channel), int8 activations (per token),
    int32 accumulation, output in the input's dtype."""

    def __init__(self, linear: nn.Linear, shared_input: _QuantizedInput | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).div_(INT8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
        # Stored [in, out] and contiguous: the layout torch._int_mm takes without a copy per call.
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).to(torch.int8).T.contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())
        self.shared_input = shared_input or _QuantizedInput()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int8, x_scale = self.shared_input.get(x)
        # Dequantise in place on one fp32 tensor: every op here is a pass over the output, and in-place fp32 ops on
        # one dtype take torch's vectorised path (mixed int32 x fp32 ops were several times slower here).
        y = torch._int_mm(x_int8, self.weight_int8).float()
        y.mul_(self.weight_scale).mul_(x_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
