"""W8A16 serving (UG-Sep): int8 weights, 16-bit activations.

``quantize_w8a16(model)`` returns a copy of a trained model for scoring in which

- every ``nn.Linear`` weight [out, in] is int8 with one fp32 scale per output channel,
- every per-slot weight of a ``MixedLinear`` ([slots, d_in, d_out]) is int8 with one scale per
  (slot, output channel), and its shared S projection as above,
- the shared embedding table ``Tokenizer.table`` [rows, d] is int8 with one scale per row,

all symmetric (q = round(w / s), s = max|w| / 127 over the channel). Biases, norm gains and the
small learned tables (positions, source types, compression queries) stay fp32. Each matmul
dequantizes its weight on the fly (q * s) to its compute dtype: autocast's where autocast is
on (``Scorer`` runs CUDA under bf16 autocast), else bf16 where the device computes bf16
natively (a GPU, or a CPU with AVX512-BF16 or AMX: ``native_bf16``), else fp32; its output
comes back in the input's dtype. So on such a CPU only the matmuls run in bf16 (about 3x the
fp32 rate at these shapes) while the norms, softmax and GELU stay fp32, where bf16 is slower.
The plain fp32 model stays the reference: tests hold the quantized scores to it within a
tolerance.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.nn import functional as F

from model.blocks import MixedLinear

QUANTIZATION_MODES = ("none", "w8a16")


def quantize_per_channel(weight: torch.Tensor, keep: tuple[int, ...]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``weight`` with one scale per index of the dims ``keep`` (the max
    taken over the others). Returns (q int8, ``weight``'s shape; scale fp32, ``weight``'s shape
    with the other dims of size 1) so that ``q * scale`` ~ ``weight``, |error| <= scale / 2."""
    w = weight.detach().float()
    kept = {k % w.dim() for k in keep}
    reduce = [i for i in range(w.dim()) if i not in kept]
    scale = w.abs().amax(dim=reduce, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


class W8A16Linear(nn.Module):
    """``nn.Linear`` with an int8 weight [out, in] and per-output-channel scales [out, 1]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_per_channel(linear.weight, (0,))
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                  requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out] in x's dtype (autocast's under autocast), the matmul in
        ``_compute_dtype``."""
        dtype = _compute_dtype(x)
        weight = self.qweight.to(dtype) * self.scale.to(dtype)
        out = _back(F.linear(x.to(dtype), weight), x)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class W8A16MixedLinear(nn.Module):
    """``MixedLinear`` with int8 weights: S projection per output channel, per-slot weights
    [slots, d_in, d_out] per (slot, output channel); same ``seq`` / ``ns`` interface."""

    def __init__(self, mixed: MixedLinear) -> None:
        super().__init__()
        self.seq_proj = W8A16Linear(mixed.seq_proj)
        q, scale = quantize_per_channel(mixed.slot_weight, (0, 2))  # per (slot, out)
        self.register_buffer("slot_qweight", q)  # [slots, d_in, d_out] int8
        self.register_buffer("slot_scale", scale)  # [slots, 1, d_out]
        self.slot_bias = nn.Parameter(mixed.slot_bias.detach().clone(), requires_grad=False)

    def seq(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq_proj(x)

    def ns(self, x: torch.Tensor, slots: slice) -> torch.Tensor:
        """x: [..., P, d_in] -> [..., P, d_out], slot p multiplied by its own weight."""
        dtype = _compute_dtype(x)
        weight = self.slot_qweight[slots].to(dtype) * self.slot_scale[slots].to(dtype)
        out = _back(torch.einsum("...pi,pio->...po", x.to(dtype), weight), x)
        return out + self.slot_bias[slots].to(out.dtype)


class W8A16Embedding(nn.Module):
    """``nn.Embedding`` with int8 rows [rows, d] and one scale per row [rows, 1]; a lookup
    dequantizes only the rows it gathers (fp32 out, as the fp32 table's)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        q, scale = quantize_per_channel(embedding.weight, (0,))
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [...] long -> [..., d] float32."""
        return self.qweight[rows].float() * self.scale[rows]

    def bag(self, rows: torch.Tensor) -> torch.Tensor:
        """rows: [..., L] (0 = empty slot) -> [..., d], the mean of each bag's non-empty rows,
        as ``model.tokens.EmbeddingTable.bag``."""
        count = (rows > 0).sum(-1, keepdim=True).clamp(min=1)
        return self(rows).sum(-2) / count


@functools.cache
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: a CUDA GPU that supports bf16, or a CPU
    with AVX512-BF16 or AMX (elsewhere bf16 matmuls are emulated, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """A matmul's dtype: autocast's when it is on for x's device, else bf16 where the device
    computes it natively (``native_bf16``), else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.bfloat16 if native_bf16(x.device) else x.dtype


def _back(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A matmul's output in the input's dtype, unless autocast is on (it keeps its own)."""
    return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def quantize_w8a16(model: nn.Module) -> nn.Module:
    """A W8A16 copy of ``model`` (left untouched) for inference: see the module docstring."""
    quantized = copy.deepcopy(model).eval()
    _swap(quantized)
    tokenizer = getattr(quantized, "tokenizer", None)
    if tokenizer is not None and isinstance(tokenizer.table, nn.Embedding):
        tokenizer.table = W8A16Embedding(tokenizer.table)
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    return quantized


def _swap(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, MixedLinear):
            setattr(module, name, W8A16MixedLinear(child))
        elif isinstance(child, nn.Linear):
            setattr(module, name, W8A16Linear(child))
        else:
            _swap(child)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and persistent buffers (what a checkpoint stores)."""
    tensors = list(model.parameters()) + [b for b in model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
