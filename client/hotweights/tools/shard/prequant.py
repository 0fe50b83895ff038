"""Sources that are already quantized: which formats are split as bytes, which are refused, and why.

The bytes of a quantized checkpoint are moved, never requantized. Each companion tensor of a
linear layer (scales, packed weights, zero points) is split along the tensor dimension that holds
the layer's split dimension; the usual "size divides into N pieces" check on the *packed* dimension
is then exactly the packing-safety check (a 4-bit GPTQ ``qzeros`` of O/8 int32 columns splits
cleanly in N iff every rank's O/N outputs fill whole int32 words).

Supported: FP8 (``quant_method`` "fp8", "fbgemm_fp8", compressed-tensors "float-quantized"; per-tensor,
per-channel and block scales), GPTQ and AWQ (4- or 8-bit in int32 words). Refused: formats whose
packing or metadata a byte split would corrupt (bitsandbytes, compressed-tensors "pack-quantized"
with its recorded unsplit ``weight_shape``, GPTQ act-order under a row split) and unknown ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hotweights.errors import InvalidArgument

# Companion suffix -> how its dimensions relate to the logical [out, in] weight:
# for each logical dim (0 = out, 1 = in), the tensor dim that carries it; None: replicate on that split.
_FP8_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".input_scale", ".output_scale", ".k_scale", ".v_scale")
_GPTQ_LAYOUT = {".qweight": (1, 0), ".qzeros": (1, 0), ".scales": (1, 0), ".g_idx": (None, 0)}
_AWQ_LAYOUT = {".qweight": (1, 0), ".qzeros": (1, 0), ".scales": (1, 0)}


@dataclass(frozen=True)
class Companion:
    base: str  # the logical weight whose rule decides the split, e.g. "...q_proj.weight"
    tensor_dim: int | None  # the dim of this tensor to split; None: replicate
    why: str = ""  # for messages when the split is refused
    block: int | None = None  # block scales: the base weight's per-rank size must be a multiple of this


@dataclass(frozen=True)
class SourceFormat:
    method: str  # "fp8", "gptq", "awq"
    config: dict[str, Any]

    def companion(self, name: str, shape: tuple[int, ...], base_split_dim: int | None) -> Companion | None:
        """How to split ``name`` given its base weight's split dim; None if it is no companion."""
        if self.method == "fp8":
            return self._fp8(name, shape, base_split_dim)
        layout = _GPTQ_LAYOUT if self.method == "gptq" else _AWQ_LAYOUT
        for suffix, dims in layout.items():
            if name.endswith(suffix):
                base = name.removesuffix(suffix) + ".weight"
                if base_split_dim is None:
                    return Companion(base, None)
                if self.method == "gptq" and base_split_dim == 1 and self.config.get("desc_act"):
                    raise InvalidArgument(
                        f"tensor {name!r}: GPTQ with desc_act=true (act-order) permutes input rows across "
                        f"quantization groups, so splitting {base!r} along its input dimension is unsafe; "
                        f"re-quantize without act-order or shard with a rules file that replicates it",
                        tensor=name,
                    )
                dim = dims[base_split_dim]
                if dim is not None and suffix in (".qzeros", ".scales") and base_split_dim == 1 and shape[0] == 1:
                    dim = None  # one quantization group (group_size -1): per-channel, same for every input slice
                return Companion(
                    base,
                    dim,
                    why=f"{self.method} packs {self.pack_factor} values per int32 word"
                    if suffix in (".qweight", ".qzeros")
                    else "",
                )
        return None

    @property
    def pack_factor(self) -> int:
        bits = int(self.config.get("bits", self.config.get("w_bit", 4)))
        return 32 // bits

    def _fp8(self, name: str, shape: tuple[int, ...], base_split_dim: int | None) -> Companion | None:
        for suffix in _FP8_SUFFIXES:
            if not name.endswith(suffix):
                continue
            base = name.removesuffix(suffix) + ".weight"
            numel = 1
            for d in shape:
                numel *= d
            if suffix not in (".weight_scale", ".weight_scale_inv") or numel == 1 or base_split_dim is None:
                return Companion(base, None)  # per-tensor and activation/KV scales hold for every slice
            if suffix == ".weight_scale_inv" or (len(shape) == 2 and shape[1] > 1):
                # Block scales [ceil(out/bn), ceil(in/bk)] split with the weight: both dims are blocked.
                blocks = self.config.get("weight_block_size") or [128, 128]
                return Companion(
                    base,
                    base_split_dim,
                    why="block scales cover whole blocks of the weight",
                    block=int(blocks[base_split_dim]),
                )
            # Per-output-channel [out, 1] or [out]: split with column-parallel rows, whole for row-parallel.
            return Companion(base, 0 if base_split_dim == 0 else None)
        return None


def source_format(config: dict[str, Any] | None) -> SourceFormat | None:
    """The quantization format of a source checkpoint, or None for plain floating-point weights."""
    if not config:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8"):
        return SourceFormat("fp8", config)
    if method == "compressed-tensors":
        formats = {str(config.get("format", ""))}
        for group in (config.get("config_groups") or {}).values():
            if isinstance(group, dict) and group.get("format"):
                formats.add(str(group["format"]))
        formats.discard("")
        if formats <= {"float-quantized", "naive-quantized"}:
            return SourceFormat("fp8", config)
        raise InvalidArgument(
            f"source is compressed-tensors {sorted(formats)}: only float-quantized (FP8) is split here; packed "
            f"formats record each weight's unsplit shape (weight_shape), which a byte split would make wrong",
            quant_method=method,
        )
    if method in ("gptq", "awq"):
        if method == "awq" and str(config.get("version", "gemm")).lower() not in ("gemm", ""):
            raise InvalidArgument(
                f"source is AWQ version {config.get('version')!r}: only the GEMM packing "
                f"([in, out/8] int32) is split here",
                quant_method=method,
            )
        bits = config.get("bits", config.get("w_bit", 4))
        if bits not in (4, 8):
            raise InvalidArgument(
                f"source is {method} with {bits}-bit weights: only 4- and 8-bit packings in int32 are split here",
                quant_method=method,
            )
        return SourceFormat(method, config)
    if method == "bitsandbytes":
        raise InvalidArgument(
            "source is bitsandbytes-quantized: it stores weights flattened with a quant_state "
            "that records the unsplit shape, so no byte split is safe; shard the original weights",
            quant_method=method,
        )
    raise InvalidArgument(
        f"source quant_method {method!r} is not supported by hotweights shard "
        f"(supported: fp8, fbgemm_fp8, compressed-tensors float-quantized, gptq, awq)",
        quant_method=method,
    )
