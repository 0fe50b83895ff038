"""``hotweights plan``: what fits on each GPU of a tensor-parallel group, from a config alone.

Per GPU: the weight bytes (exact from a sharded directory's manifest, else estimated from
config.json by the split rules ``hotweights shard`` applies and the layouts serving engines load),
what is left after the weights and a reserve, the KV-cache bytes one token takes on that GPU, and so
how many tokens, and how many sequences of the model's maximum context, the KV cache can hold.

Weights. Linear layers take the weight format's size: packed formats count their packing and scales
(MXFP4: 4 bits and one 8-bit scale per 32 weights; NVFP4: 4 bits, one FP8 scale per 16 weights and
two float32 scalars per tensor; FP8: one float32 scale per output row, or per 128x128 block where the
config says ``weight_block_size``; int4: a float16 scale and a 4-bit zero per 128 weights).
Embeddings, lm_head, norms and MoE routers stay in the source precision. A config that is quantized
already (``quantization_config``) keeps the modules it excludes (``modules_to_not_convert``,
``ignore``, ``ignored_layers``, ``exclude_modules``) in the source precision too: gpt-oss is MXFP4 in
its experts only. Multi-token-prediction layers (``num_nextn_predict_layers``) are not counted: engines
load them for speculative decoding only.

KV cache, per token and GPU:
- multi-head and grouped-query attention: 2 (K and V) x layers x KV heads on this GPU x head_dim x
  bits / 8. KV heads per GPU: num_key_value_heads / tp when tp divides it; with fewer KV heads than
  GPUs each GPU holds one replicated KV head (tp must then be a multiple of the KV head count);
- multi-head latent attention (DeepSeek-V2/V3, ``kv_lora_rank``): layers x (kv_lora_rank +
  qk_rope_head_dim) x bits / 8, the compressed latent, cached whole on every GPU of the group;
- sliding-window layers (``layer_types`` naming ``sliding_attention``, or ``sliding_window`` on every
  layer) hold at most ``sliding_window`` tokens of a sequence, so a sequence of L tokens costs the
  full layers' bytes x L plus the sliding layers' bytes x min(L, window).
Every GPU holds its heads' share of every token, so the per-GPU capacity is the group's capacity.
Sizes are decimal (1 GB = 10^9 bytes) unless written with GiB. ``reserve`` defaults to 0 here and
to 5 GB on the command line (CUDA context, activations, the runtime's workspace).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Callable
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
DEFAULT_KV = ("fp16", "fp8")


@dataclass(frozen=True)
class WeightFormat:
    """How a linear layer's weight is stored: packed bits per weight plus its scales."""

    name: str
    bits: float
    group: int = 0  # weights along the input dimension that share one scale (0: none)
    group_bytes: float = 0  # bytes of that scale (and zero point)
    row_bytes: int = 0  # bytes per output row (FP8 per-channel scales)
    block: tuple[int, int] | None = None  # one float32 scale per (rows, columns) block
    tensor_bytes: int = 0  # per tensor (global scales)

    @property
    def packed(self) -> bool:
        return self.bits < 16

    def linear_bytes(self, rows: int, cols: int) -> float:
        n = rows * cols * self.bits / 8
        n += rows * self.row_bytes
        if self.group:
            n += rows * math.ceil(cols / self.group) * self.group_bytes
        if self.block is not None:
            n += math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1]) * 4
        return n + self.tensor_bytes


FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", 32),
    "bf16": WeightFormat("bf16", 16),
    "fp16": WeightFormat("fp16", 16),
    "fp8": WeightFormat("fp8", 8, row_bytes=4),
    # GPTQ/AWQ-style: per 128 weights of an output channel, an fp16 scale and a 4-bit zero
    "int4": WeightFormat("int4", 4, group=128, group_bytes=2.5),
    # OCP microscaling: an E8M0 scale per 32 weights
    "mxfp4": WeightFormat("mxfp4", 4, group=32, group_bytes=1),
    # an E4M3 scale per 16 weights, and float32 weight_scale_2 and input_scale per tensor
    "nvfp4": WeightFormat("nvfp4", 4, group=16, group_bytes=1, tensor_bytes=8),
}
WEIGHT_FORMATS = tuple(FORMATS)


@dataclass
class KvRow:
    kv: str
    bits: float
    kv_bytes_per_token: float  # on one GPU, every layer counted (a token within every window)
    kv_bytes_per_token_all_gpus: float  # the whole group, replicated KV counted on every GPU
    kv_bytes_per_token_past_window: float  # on one GPU: the full-attention layers only
    kv_bytes_per_sequence: float | None  # on one GPU, one sequence of max_context tokens
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
    attention: str  # "mha" (multi-head or grouped-query) or "mla" (multi-head latent)
    num_hidden_layers: int
    num_key_value_heads: int
    kv_heads_per_gpu: int
    kv_heads_replicated: bool
    head_dim: int  # per KV head; for MLA the cached latent's width (kv_lora_rank + qk_rope_head_dim)
    sliding_window: int | None
    sliding_window_layers: int
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
    if max_context is not None and max_context <= 0:
        raise InvalidArgument(f"--max-context must be positive, not {max_context}")
    notes: list[str] = []

    if weights is not None and weights not in FORMATS:
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
    mtp = cfg.raw.get("num_nextn_predict_layers")
    if isinstance(mtp, int) and mtp > 0 and manifest is None:
        notes.append(f"{mtp} multi-token-prediction layer(s) not counted (loaded for speculative decoding only)")

    mla = is_mla(cfg)
    if mla:
        latent = _int(cfg, "kv_lora_rank") + _int(cfg, "qk_rope_head_dim")
        kv_heads, per_gpu, replicated, head_dim, kv_tensors = 1, 1, tp > 1, latent, 1
    else:
        kv_heads = cfg.num_key_value_heads
        per_gpu, replicated = kv_heads_per_gpu(kv_heads, tp)
        head_dim, kv_tensors = cfg.head_dim, 2
    ctx = max_context or cfg.max_position_embeddings
    window, sliding = sliding_layers(cfg)
    full_layers = cfg.num_hidden_layers - len(sliding)
    if window is not None and ctx is None:
        notes.append("no max context known: sliding-window layers counted at full context (give --max-context)")
    rows = []
    for label, bits in [kv_option(s) for s in (kv or DEFAULT_KV)]:
        per_layer = kv_tensors * per_gpu * head_dim * bits / 8
        per_token = _whole(cfg.num_hidden_layers * per_layer)
        past_window = _whole(full_layers * per_layer)
        if window is None or ctx is None:
            capacity = int(max(free, 0) // per_token) if per_token else 0
            per_seq = per_token * ctx if ctx else None
            seqs = capacity // ctx if ctx else None
        else:
            per_seq = _whole(past_window * ctx + len(sliding) * per_layer * min(ctx, window))
            seqs = int(max(free, 0) // per_seq) if per_seq else 0
            # tokens held when every sequence runs to max_context
            capacity = int(max(free, 0) * ctx // per_seq) if per_seq else 0
        rows.append(
            KvRow(
                kv=label,
                bits=bits,
                kv_bytes_per_token=per_token,
                kv_bytes_per_token_all_gpus=per_token * tp,
                kv_bytes_per_token_past_window=past_window,
                kv_bytes_per_sequence=per_seq,
                kv_capacity_tokens=capacity,
                sequences_at_max_context=seqs,
                compression_vs_16bit=round(16 / bits, 3),
            )
        )
    if free <= 0:
        notes.insert(0, _does_not_fit(cfg, tp, weights, exact, reserve, gpu_memory, manifest is not None))
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
        attention="mla" if mla else "mha",
        num_hidden_layers=cfg.num_hidden_layers,
        num_key_value_heads=kv_heads,
        kv_heads_per_gpu=per_gpu,
        kv_heads_replicated=replicated,
        head_dim=head_dim,
        sliding_window=window,
        sliding_window_layers=len(sliding),
        max_context=ctx,
        kv_options=rows,
        notes=notes,
    )


def _does_not_fit(cfg: ModelConfig, tp: int, weights: str, exact: int, reserve: int, memory: int, sharded: bool) -> str:
    line = (
        f"does not fit: the weights ({exact / 1e9:,.2f} GB per GPU) and the reserve ({reserve / 1e9:,.2f} GB) "
        f"need more than the {memory / 1e9:,.2f} GB of each GPU"
    )
    if sharded:
        return line
    for bigger in (2, 4, 8, 16, 32, 64):
        if bigger <= tp:
            continue
        try:
            if estimate_weight_bytes_per_gpu(cfg, bigger, weights) + reserve < memory:
                return f"{line}; at tp {bigger} the {weights} weights fit"
        except InvalidArgument:
            continue
    return line


def _whole(x: float) -> float:
    return int(x) if float(x).is_integer() else x


def _int(cfg: ModelConfig, key: str, default: int = 0) -> int:
    value = cfg.raw.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def is_mla(cfg: ModelConfig) -> bool:
    return bool(_int(cfg, "kv_lora_rank"))


def sliding_layers(cfg: ModelConfig) -> tuple[int | None, list[int]]:
    """(window, indices of the layers that attend within it), as the config says."""
    window = _int(cfg, "sliding_window")
    if not window or cfg.raw.get("use_sliding_window") is False:
        return None, []
    types = cfg.raw.get("layer_types")
    if isinstance(types, list) and len(types) == cfg.num_hidden_layers:
        layers = [i for i, t in enumerate(types) if isinstance(t, str) and "sliding" in t]
    elif cfg.model_type.startswith("qwen") and "max_window_layers" in cfg.raw:
        layers = list(range(_int(cfg, "max_window_layers"), cfg.num_hidden_layers))
    else:
        layers = list(range(cfg.num_hidden_layers))
    return (window, layers) if layers else (None, [])


def kv_heads_per_gpu(kv_heads: int, tp: int) -> tuple[int, bool]:
    """(KV heads each GPU holds, whether they are replicated across GPUs)."""
    if kv_heads % tp == 0:
        return kv_heads // tp, False
    if tp % kv_heads == 0:
        return 1, True
    raise InvalidArgument(f"tp {tp} neither divides num_key_value_heads {kv_heads} nor is a multiple of it", tp=tp)


def default_weights(cfg: ModelConfig) -> str:
    return native_format(cfg).name


def native_format(cfg: ModelConfig) -> WeightFormat:
    """The format a config's own checkpoint stores its linear layers in."""
    q = cfg.quantization_config or {}
    method = str(q.get("quant_method", "")).lower()
    if method == "mxfp4":
        return FORMATS["mxfp4"]
    if method == "modelopt":
        algo = str(q.get("quant_algo", "")).upper()
        return FORMATS["nvfp4" if "NVFP4" in algo else "fp8"]
    if method == "compressed-tensors":
        for group in (q.get("config_groups") or {}).values():
            w = (group or {}).get("weights") or {}
            if w.get("num_bits") == 4:
                return FORMATS["nvfp4" if w.get("type") == "float" and w.get("group_size") == 16 else "int4"]
        return FORMATS["fp8"]
    if method in ("fp8", "fbgemm_fp8"):
        block = q.get("weight_block_size")
        if isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
            return WeightFormat("fp8", 8, block=(block[0], block[1]))
        return FORMATS["fp8"]
    if method in ("gptq", "awq"):
        return FORMATS["int4"]
    return FORMATS[{"float32": "fp32", "float16": "fp16"}.get(cfg.torch_dtype, "bf16")]


def _excluded(cfg: ModelConfig) -> Callable[[str], bool]:
    """Whether a module stays in the source precision by the config's own quantization_config."""
    q = cfg.quantization_config or {}
    patterns: list[str] = []
    for key in ("modules_to_not_convert", "ignore", "ignored_layers", "exclude_modules"):
        value = q.get(key)
        if isinstance(value, list):
            patterns += [p for p in value if isinstance(p, str)]

    def match(module: str) -> bool:
        for p in patterns:
            if p.startswith("re:"):
                if re.match(p[3:], module):
                    return True
            elif module == p or module.startswith(p + ".") or fnmatch.fnmatchcase(module, p):
                return True
            elif fnmatch.fnmatchcase(module, p + ".*"):
                return True
        return False

    return match


def estimate_weight_bytes_per_gpu(cfg: ModelConfig, tp: int, weights: str) -> int:
    """Bytes of one GPU's shard, by the split rules ``hotweights shard`` applies (see shard/rules.py)
    and, for what it does not shard (multi-head latent attention, stacked experts), the layout vLLM
    and SGLang load: column-parallel projections split their rows, row-parallel ones their columns,
    MLA's down-projections (q_a_proj, kv_a_proj_with_mqa) are replicated.

    ``weights`` equal to the config's own quantization keeps that quantization's scope and scales;
    another format applies to every linear layer, as ``hotweights shard --quantize`` does.
    """
    if weights not in FORMATS:
        raise InvalidArgument(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, not {weights!r}")
    h = cfg.hidden_size
    if cfg.num_attention_heads % tp:
        raise InvalidArgument(f"tp {tp} does not divide num_attention_heads {cfg.num_attention_heads}", tp=tp)
    if cfg.vocab_size % tp:
        raise InvalidArgument(f"tp {tp} does not divide vocab_size {cfg.vocab_size} (no vocabulary padding)", tp=tp)
    native = native_format(cfg)
    fmt = native if native.name == weights and cfg.quantization_config else FORMATS[weights]
    excluded = _excluded(cfg) if fmt is native else (lambda _m: False)
    src = {"fp32": 4, "bf16": 2, "fp16": 2}.get(weights, cfg.dtype_bytes)  # bytes of what is not quantized

    def linear(module: str, rows: int, cols: int) -> float:
        """One linear layer's weight on this GPU (a row-parallel layer keeps all its output rows)."""
        if fmt.packed and not excluded(module):
            return fmt.linear_bytes(rows, cols)
        return rows * cols * src

    def mlp(prefix: str, inter: int, bias: bool = False) -> float:
        if inter % tp:
            raise InvalidArgument(f"tp {tp} does not divide an MLP width of {inter}", tp=tp)
        local = inter // tp
        biases = (2 * local + h) * src if bias else 0  # gate/up biases split, down's whole
        return (
            linear(prefix + "gate_proj", local, h)
            + linear(prefix + "up_proj", local, h)
            + linear(prefix + "down_proj", h, local)
            + biases
        )

    def attention(p: str) -> float:
        heads = cfg.num_attention_heads // tp
        if is_mla(cfg):
            nope, rope, v = _int(cfg, "qk_nope_head_dim"), _int(cfg, "qk_rope_head_dim"), _int(cfg, "v_head_dim")
            q_lora, kv_lora = _int(cfg, "q_lora_rank"), _int(cfg, "kv_lora_rank")
            a = p + "self_attn."
            if q_lora:
                out = linear(a + "q_a_proj", q_lora, h) + q_lora * src  # and q_a_layernorm, replicated
                out += linear(a + "q_b_proj", heads * (nope + rope), q_lora)
            else:
                out = linear(a + "q_proj", heads * (nope + rope), h)
            out += linear(a + "kv_a_proj_with_mqa", kv_lora + rope, h) + kv_lora * src  # and kv_a_layernorm
            out += linear(a + "kv_b_proj", heads * (nope + v), kv_lora)
            return out + linear(a + "o_proj", h, heads * v)
        hd = cfg.head_dim
        kv_local, _ = kv_heads_per_gpu(cfg.num_key_value_heads, tp)
        q_out, kv_out = heads * hd, kv_local * hd
        a = p + "self_attn."
        out = linear(a + "q_proj", q_out, h) + linear(a + "k_proj", kv_out, h) + linear(a + "v_proj", kv_out, h)
        out += linear(a + "o_proj", h, q_out)
        if cfg.qkv_bias:
            out += (q_out + 2 * kv_out) * src
        if cfg.o_bias:
            out += h * src  # row-parallel: whole on every GPU
        if cfg.model_type in ("qwen3", "qwen3_moe"):
            out += 2 * hd * src  # q_norm, k_norm
        if cfg.model_type == "gpt_oss":
            out += heads * src  # attention sinks, one per head
        return out

    n_routed = _int(cfg, "n_routed_experts")  # DeepSeek's name for the routed experts
    experts = n_routed or cfg.num_experts
    first_dense, freq = _int(cfg, "first_k_dense_replace"), _int(cfg, "moe_layer_freq", 1) or 1
    mlp_only = set(cfg.raw.get("mlp_only_layers") or [])
    step = int(cfg.raw.get("decoder_sparse_step") or 1)
    moe_prefix = "block_sparse_moe." if cfg.model_type == "mixtral" else "mlp."
    expert_bias = cfg.model_type == "gpt_oss"

    def is_moe(i: int) -> bool:
        if not experts:
            return False
        if n_routed:
            return i >= first_dense and i % freq == 0
        return i not in mlp_only and (i + 1) % step == 0

    total: float = cfg.vocab_size // tp * h * src  # embed_tokens
    if cfg.tie_word_embeddings is not True:
        total += cfg.vocab_size // tp * h * src  # lm_head
    total += h * src  # final norm
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layer = attention(p) + 2 * h * src  # and the two norms
        if is_moe(i):
            e = p + moe_prefix + "experts."
            layer += experts * mlp(e, cfg.moe_intermediate_size, expert_bias)
            layer += experts * h * src  # the router
            if expert_bias:
                layer += experts * src  # its bias
            if cfg.raw.get("topk_method") == "noaux_tc":
                layer += experts * 4  # e_score_correction_bias, float32
            if cfg.shared_expert_intermediate_size:
                layer += mlp(p + "mlp.shared_expert.", cfg.shared_expert_intermediate_size) + h * src  # and gate
            shared = _int(cfg, "n_shared_experts")
            if shared and n_routed:
                layer += mlp(p + "mlp.shared_experts.", shared * cfg.moe_intermediate_size)
        else:
            layer += mlp(p + "mlp.", cfg.intermediate_size, cfg.mlp_bias)
        total += layer
    return int(math.ceil(total))


def format_plan(p: Plan) -> str:
    def gb(n: float) -> str:
        return f"{n / 1e9:,.2f} GB"

    if p.attention == "mla":
        kv_line = (
            f"KV cache     multi-head latent attention: a {p.head_dim}-wide latent per layer, "
            f"{'cached whole on every GPU' if p.tp > 1 else 'one GPU'}, {p.num_hidden_layers} layers"
        )
    else:
        kv_line = (
            f"KV heads     {p.num_key_value_heads} -> {p.kv_heads_per_gpu} per GPU"
            f"{' (replicated: fewer KV heads than GPUs)' if p.kv_heads_replicated else ''}, head_dim {p.head_dim}, "
            f"{p.num_hidden_layers} layers"
        )
    if p.sliding_window:
        kv_line += f", {p.sliding_window_layers} of them within a {p.sliding_window}-token window"
    lines = [
        f"model        {p.model} ({p.architecture or 'unknown architecture'}), tp {p.tp}",
        f"per GPU      {gb(p.gpu_memory_bytes)}, reserve {gb(p.reserve_bytes)}",
        f"weights      {gb(p.weights_bytes_per_gpu)} per GPU, {p.weights} "
        f"({'exact, from hotweights.json' if p.weights_from == 'manifest' else 'estimated from config.json'})",
        f"free         {gb(p.free_bytes_per_gpu)} per GPU after weights and reserve",
        kv_line,
        "",
        f"{'KV cache':<12} {'bits':>5} {'bytes/token/GPU':>16} {'tokens':>14} "
        f"{'seqs @ ' + str(p.max_context) if p.max_context else 'seqs':>14}",
    ]
    for r in p.kv_options:
        seqs = "-" if r.sequences_at_max_context is None else f"{r.sequences_at_max_context:,}"
        lines.append(f"{r.kv:<12} {r.bits:>5g} {r.kv_bytes_per_token:>16,} {r.kv_capacity_tokens:>14,} {seqs:>14}")
    if p.sliding_window and p.max_context:
        lines.append(
            f"(bytes/token counts every layer; past the window a token costs "
            f"{p.kv_options[0].kv_bytes_per_token_past_window:,} B at {p.kv_options[0].kv}; "
            f"tokens: held when every sequence runs to {p.max_context})"
        )
    lines += [f"note: {n}" for n in p.notes]
    if not p.fits:
        lines.append(f"DOES NOT FIT on {gb(p.gpu_memory_bytes)} GPUs at tp {p.tp}")
    return "\n".join(lines)
