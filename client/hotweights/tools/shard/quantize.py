"""FP8 (E4M3) weight quantization and the config.json entry vLLM reads to load it.

Scales are float32 and multiply: ``w ≈ q.float() * scale``. Per-output-channel scales (one per row
of the [out, in] weight, stored [out, 1]) are the default: one outlier row then costs precision in
that row only. Per-tensor scales (one scalar) are what vLLM's ``quant_method: "fp8"`` loader takes;
per-channel FP8 is loaded by vLLM through the compressed-tensors format (``strategy: "channel"``),
so the config entry follows the granularity. Activations are quantized dynamically at run time:
there is no calibration data here to fix static input scales.

Quantization happens on the whole source tensor before it is split, so a TP-N shard holds exactly
the rows of the unsharded FP8 checkpoint and per-tensor scales are the same on every rank.
"""

from __future__ import annotations

from typing import Any

import torch

from hotweights.errors import InvalidArgument

GRANULARITIES = ("channel", "tensor")
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
_FLOAT_SOURCES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".weight_scale"


def scale_shape(weight_shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    return (weight_shape[0], 1) if granularity == "channel" else ()


def check_quantizable(name: str, dtype_name: str, shape: tuple[int, ...]) -> None:
    if dtype_name not in ("F32", "F16", "BF16", "F64"):
        raise InvalidArgument(
            f"tensor {name!r} is {dtype_name}: only floating-point weights can be quantized to FP8", tensor=name
        )
    if len(shape) != 2:
        raise InvalidArgument(
            f"tensor {name!r} has shape {list(shape)}: FP8 quantization here takes 2-D [out, in] linear weights",
            tensor=name,
        )


def quantize_fp8(weight: torch.Tensor, granularity: str, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 weight, float32 scale) with ``weight ≈ q.float() * scale``.

    A weight holding inf or NaN, or values beyond float32's range, is refused (``InvalidArgument``
    naming ``name``): its scale would be inf and its row NaN after dequantizing."""
    what = f"tensor {name!r}" if name else "the tensor"
    if weight.dtype not in _FLOAT_SOURCES:
        raise InvalidArgument(f"cannot quantize {what} ({weight.dtype}) to FP8", tensor=name)
    if granularity not in GRANULARITIES:
        raise InvalidArgument(f"FP8 scale granularity must be one of {', '.join(GRANULARITIES)}, not {granularity!r}")
    if weight.numel() == 0:
        # Nothing to scale (a [0, in] or [out, 0] weight): an empty FP8 weight, and scale 1 for each row it has.
        shape = scale_shape(tuple(weight.shape), granularity)
        return torch.empty(weight.shape, dtype=FP8_DTYPE), torch.ones(shape, dtype=torch.float32)
    # One float32 working copy, divided in place: the sharder runs several of these at once on big tensors.
    w = weight.to(torch.float32, copy=True)
    amax = w.abs().amax(dim=1, keepdim=True) if granularity == "channel" else w.abs().amax()
    # amax is inf exactly where a value is inf or beyond float32 (an F64 source), NaN where one is NaN
    if not bool(torch.isfinite(amax).all()):
        raise InvalidArgument(
            f"{what} holds values that are not finite in float32 (inf, NaN, or beyond float32's range): "
            f"it cannot be quantized to FP8; fix the checkpoint or leave the tensor unquantized",
            tensor=name,
        )
    # An all-zero row would give a zero scale and 0/0 below; any positive scale encodes zeros exactly. A row
    # whose amax / 448 underflows float32 gets the smallest normal scale instead: it then encodes as zeros
    # (an error below 1e-38), never as 0/0.
    tiny = torch.finfo(torch.float32).tiny
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(tiny), torch.ones_like(amax))
    q = w.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale.to(torch.float32).reshape(scale_shape(tuple(weight.shape), granularity))


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale.to(torch.float32)


def quantization_config(granularity: str, ignored_modules: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of config.json for FP8 weights with dynamic activation scales.

    ``ignored_modules`` are the linear modules kept in the source precision (lm_head, MoE routers).
    """
    ignored = sorted(ignored_modules)
    if granularity == "tensor":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ignored}
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": "float-quantized",
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "channel",
                    "symmetric": True,
                    "dynamic": False,
                    "group_size": None,
                },
                "input_activations": {
                    "num_bits": 8,
                    "type": "float",
                    "strategy": "token",
                    "symmetric": True,
                    "dynamic": True,
                },
                "output_activations": None,
            }
        },
        "ignore": ignored,
        "kv_cache_scheme": None,
    }
