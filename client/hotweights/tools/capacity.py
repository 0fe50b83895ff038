"""``hotweights plan``: what fits on each GPU of a tensor-parallel group, from a config alone.

Per GPU: the weight bytes (exact from a sharded directory's manifest, else estimated from
config.json by the same split rules ``hotweights shard`` applies), what is left after the weights
and a reserve, the KV-cache bytes one token takes on that GPU, and so how many tokens, and how many
sequences of the model's maximum context, the KV cache can hold.

KV bytes per token per GPU = 2 (K and V) x layers x KV heads on this GPU x head_dim x bits / 8.
KV heads per GPU: num_key_value_heads / tp when tp divides it; when there are fewer KV heads than
GPUs each GPU holds one replicated KV head (tp must then be a multiple of the KV head count).
Every GPU holds its heads' share of every token, so the per-GPU capacity is the group's capacity.
Sizes are decimal (1 GB = 10^9 bytes) unless written with GiB. ``reserve`` defaults to 0 here and
to 5 GB on the command line (CUDA context, activations, the runtime's workspace).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hotweights.errors import InvalidArgument
from hotweights.format.manifest import load_manifest
from hotweights.tools.shard.model_config import ModelConfig, check_tp, load_config

# KV-cache element sizes in bits, by the names serving engines use for --kv-cache-dtype.
KV_BITS: dict[str, float] = {
    "fp32": 32,
    "float32": 32,
    "fp16": 16,
    "float16": 16,
    "half": 16,
    "bf16": 16,
    "bfloat16": 16,
    "fp8": 8,
    "fp8_e4m3": 8,
    "fp8_e5m2": 8,
    "int8": 8,
    "int4": 4,
    "fp4": 4,
}
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "fp8", "int4")
DEFAULT_KV = ("fp16", "fp8")
INT4_GROUP = 128  # GPTQ/AWQ-style: per 128 weights of an output channel, an fp16 scale and a 4-bit zero


@dataclass
class KvRow:
    kv: str
    bits: float
    kv_bytes_per_token: float  # on one GPU
    kv_bytes_per_token_all_gpus: float  # the whole group, replicated KV heads counted on every GPU
    kv_capacity_tokens: int
    sequences_at_max_context: int | None
    compression_vs_16bit: float


@dataclass
class Plan:
    model: str
    architecture: str
    tp: int
    gpu_memory_bytes: int
    reserve_bytes: int
    weights: str
    weights_from: str  # "manifest" (exact) or "estimate" (config.json)
    weights_bytes_per_gpu: int
    weights_bytes_per_gpu_estimate: int
    free_bytes_per_gpu: int
    num_hidden_layers: int
    num_key_value_heads: int
    kv_heads_per_gpu: int
    kv_heads_replicated: bool
    head_dim: int
    max_context: int | None
    kv_options: list[KvRow]
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.free_bytes_per_gpu > 0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["fits"] = self.fits
        # The first KV option asked for, at the top level, for scripts that ask for one.
        first = self.kv_options[0]
        doc["kv"] = first.kv
        doc["kv_bytes_per_token"] = first.kv_bytes_per_token
        doc["kv_capacity_tokens"] = first.kv_capacity_tokens
        doc["sequences_at_max_context"] = first.sequences_at_max_context
        return doc


def kv_option(spec: str) -> tuple[str, float]:
    """A KV option from a dtype name ("fp8") or a bit count ("4", "3.5", "4bit")."""
    key = spec.strip().lower()
    if key in KV_BITS:
        return key, KV_BITS[key]
    number = key.removesuffix("-bit").removesuffix("bit").removesuffix("b")
    try:
        bits = float(number)
    except ValueError:
        raise InvalidArgument(
            f"unknown KV option {spec!r}: give a dtype ({', '.join(sorted(KV_BITS))}) or a bit count such as 4 or 3.5"
        ) from None
    if not 0 < bits <= 64:
        raise InvalidArgument(f"KV bits must be in (0, 64], not {spec!r}")
    return f"{bits:g}-bit", bits


def plan(
    model: str | Path,
    tp: int | None,
    gpu_memory: int,
    *,
    weights: str | None = None,
    kv: list[str] | None = None,
    reserve: int = 0,
    max_context: int | None = None,
) -> Plan:
    path = Path(model).expanduser()
    cfg = load_config(path)
    cfg.require("num_hidden_layers", "num_attention_heads", "hidden_size", "vocab_size")
    if "kv_lora_rank" in cfg.raw:
        raise InvalidArgument(
            f"{cfg.architecture or path}: multi-head latent attention (kv_lora_rank) caches a "
            f"compressed latent, not per-head K and V; plan does not model it yet"
        )
    manifest = load_manifest(path) if path.is_dir() else None
    if manifest is not None:
        if tp is not None and tp != manifest.tp_size:
            raise InvalidArgument(f"{path} is sharded for tp {manifest.tp_size}, not {tp}", tp=tp)
        tp = manifest.tp_size
    if tp is None:
        raise InvalidArgument("--tp is required for a model without a hotweights.json manifest")
    check_tp(tp)
    if gpu_memory <= 0:
        raise InvalidArgument(f"--gpu-memory must be positive, not {gpu_memory}")
    if reserve < 0:
        raise InvalidArgument(f"--reserve must not be negative, not {reserve}")
    notes: list[str] = []

    if weights is not None and weights not in WEIGHT_FORMATS:
        raise InvalidArgument(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    if manifest is not None:
        # The directory's bytes are what they are: estimate the same format, so the two compare.
        q = manifest.doc.get("quantization") or {}
        held = {"fp8": "fp8", "gptq": "int4", "awq": "int4"}.get(str(q.get("method")), default_weights(cfg))
        if weights is not None and weights != held:
            notes.append(f"--weights {weights} ignored: {path} holds {held} weights")
        weights = held
    weights = weights or default_weights(cfg)
    estimate = estimate_weight_bytes_per_gpu(cfg, tp, weights)
    exact = max(manifest.rank_weight_bytes()) if manifest is not None else estimate
    weights_from = "manifest" if manifest is not None else "estimate"
    free = gpu_memory - reserve - exact
    if free <= 0:
        notes.append(f"the weights ({exact} bytes per GPU) and reserve do not fit in {gpu_memory} bytes")

    kv_heads = cfg.num_key_value_heads
    per_gpu, replicated = kv_heads_per_gpu(kv_heads, tp)
    ctx = max_context or cfg.max_position_embeddings
    if cfg.raw.get("sliding_window") and cfg.raw.get("use_sliding_window", True):
        notes.append(f"sliding_window {cfg.raw['sliding_window']} is ignored: every layer is counted at full context")
    rows = []
    for label, bits in [kv_option(s) for s in (kv or DEFAULT_KV)]:
        per_token = 2 * cfg.num_hidden_layers * per_gpu * cfg.head_dim * bits / 8
        per_token = int(per_token) if float(per_token).is_integer() else per_token
        capacity = int(max(free, 0) // per_token) if per_token else 0
        rows.append(
            KvRow(
                kv=label,
                bits=bits,
                kv_bytes_per_token=per_token,
                kv_bytes_per_token_all_gpus=per_token * tp,
                kv_capacity_tokens=capacity,
                sequences_at_max_context=capacity // ctx if ctx else None,
                compression_vs_16bit=round(16 / bits, 3),
            )
        )
    return Plan(
        model=str(path),
        architecture=cfg.architecture,
        tp=tp,
        gpu_memory_bytes=gpu_memory,
        reserve_bytes=reserve,
        weights=weights,
        weights_from=weights_from,
        weights_bytes_per_gpu=exact,
        weights_bytes_per_gpu_estimate=estimate,
        free_bytes_per_gpu=free,
        num_hidden_layers=cfg.num_hidden_layers,
        num_key_value_heads=kv_heads,
        kv_heads_per_gpu=per_gpu,
        kv_heads_replicated=replicated,
        head_dim=cfg.head_dim,
        max_context=ctx,
        kv_options=rows,
        notes=notes,
    )


def kv_heads_per_gpu(kv_heads: int, tp: int) -> tuple[int, bool]:
    """(KV heads each GPU holds, whether they are replicated across GPUs)."""
    if kv_heads % tp == 0:
        return kv_heads // tp, False
    if tp % kv_heads == 0:
        return 1, True
    raise InvalidArgument(f"tp {tp} neither divides num_key_value_heads {kv_heads} nor is a multiple of it", tp=tp)


def default_weights(cfg: ModelConfig) -> str:
    q = cfg.quantization_config or {}
    method = str(q.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8", "compressed-tensors"):
        return "fp8"
    if method in ("gptq", "awq"):
        return "int4"
    return {"float32": "fp32", "float16": "fp16"}.get(cfg.torch_dtype, "bf16")


def estimate_weight_bytes_per_gpu(cfg: ModelConfig, tp: int, weights: str) -> int:
    """Bytes of one GPU's shard, by the split rules ``hotweights shard`` applies (see shard/rules.py).

    Linear layers take ``weights``' size (FP8 adds float32 per-output-channel scales, int4 adds group
    scales and zeros); embeddings, lm_head, norms and routers stay in the source precision.
    """
    h, hd = cfg.hidden_size, cfg.head_dim
    if cfg.num_attention_heads % tp:
        raise InvalidArgument(f"tp {tp} does not divide num_attention_heads {cfg.num_attention_heads}", tp=tp)
    if cfg.vocab_size % tp:
        raise InvalidArgument(f"tp {tp} does not divide vocab_size {cfg.vocab_size} (no vocabulary padding)", tp=tp)
    src = {"fp32": 4, "bf16": 2, "fp16": 2}.get(weights, cfg.dtype_bytes)  # bytes of what is not quantized
    kv_local, _ = kv_heads_per_gpu(cfg.num_key_value_heads, tp)
    q_out = cfg.num_attention_heads // tp * hd
    kv_out = kv_local * hd

    def linear(out_local: int, in_local: int) -> float:
        """One linear layer's bytes on this GPU (a row-parallel layer keeps all its output rows)."""
        n = out_local * in_local
        if weights == "fp8":
            return n + 4 * out_local  # float32 per-channel scales, split with rows or whole (row-parallel)
        if weights == "int4":
            return n / 2 + n * 2.5 / INT4_GROUP
        return n * (4 if weights == "fp32" else 2)

    def mlp(inter: int, bias: bool = False) -> float:
        if inter % tp:
            raise InvalidArgument(f"tp {tp} does not divide an MLP width of {inter}", tp=tp)
        local = inter // tp
        biases = (2 * local + h) * src if bias else 0  # gate/up biases split, down's whole
        return 2 * linear(local, h) + linear(h, local) + biases

    total: float = cfg.vocab_size // tp * h * src  # embed_tokens
    if cfg.tie_word_embeddings is not True:
        total += cfg.vocab_size // tp * h * src  # lm_head
    total += h * src  # final norm
    mlp_only = set(cfg.raw.get("mlp_only_layers") or [])
    step = int(cfg.raw.get("decoder_sparse_step") or 1)
    qk_norm = cfg.model_type in ("qwen3", "qwen3_moe")
    for i in range(cfg.num_hidden_layers):
        layer = linear(q_out, h) + 2 * linear(kv_out, h) + linear(h, q_out)
        if cfg.qkv_bias:
            layer += (q_out + 2 * kv_out) * src
        if cfg.o_bias:
            layer += h * src  # row-parallel: whole on every GPU
        layer += 2 * h * src + (2 * hd * src if qk_norm else 0)
        if cfg.num_experts and i not in mlp_only and (i + 1) % step == 0:
            layer += cfg.num_experts * mlp(cfg.moe_intermediate_size) + cfg.num_experts * h * src  # experts, router
            if cfg.shared_expert_intermediate_size:
                layer += mlp(cfg.shared_expert_intermediate_size) + h * src  # shared expert and its gate
        else:
            layer += mlp(cfg.intermediate_size, cfg.mlp_bias)
        total += layer
    return int(math.ceil(total))


def format_plan(p: Plan) -> str:
    def gb(n: float) -> str:
        return f"{n / 1e9:,.2f} GB"

    lines = [
        f"model        {p.model} ({p.architecture or 'unknown architecture'}), tp {p.tp}",
        f"per GPU      {gb(p.gpu_memory_bytes)}, reserve {gb(p.reserve_bytes)}",
        f"weights      {gb(p.weights_bytes_per_gpu)} per GPU, {p.weights} "
        f"({'exact, from hotweights.json' if p.weights_from == 'manifest' else 'estimated from config.json'})",
        f"free         {gb(p.free_bytes_per_gpu)} per GPU after weights and reserve",
        f"KV heads     {p.num_key_value_heads} -> {p.kv_heads_per_gpu} per GPU"
        f"{' (replicated: fewer KV heads than GPUs)' if p.kv_heads_replicated else ''}, head_dim {p.head_dim}, "
        f"{p.num_hidden_layers} layers",
        "",
        f"{'KV cache':<12} {'bits':>5} {'bytes/token/GPU':>16} {'tokens':>14} "
        f"{'seqs @ ' + str(p.max_context) if p.max_context else 'seqs':>14}",
    ]
    for r in p.kv_options:
        seqs = "-" if r.sequences_at_max_context is None else f"{r.sequences_at_max_context:,}"
        lines.append(f"{r.kv:<12} {r.bits:>5g} {r.kv_bytes_per_token:>16,} {r.kv_capacity_tokens:>14,} {seqs:>14}")
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
