"""Serving engines' parameter layouts, as data: which checkpoint tensors an engine fuses into which of
its parameters, and how a tensor-parallel rank's part of each is cut. Nothing here imports torch or an
engine; the daemon applies a layout while it places a rank's tensors (``fused_groups``), and the
offline converter (``hotweights.vllm_layout``) builds the same tensors with torch.

vLLM (Llama family, Mixtral) fuses by concatenation along dim 0 and splits Megatron-style; per rank ``r`` of ``tp``:
- ``qkv_proj`` = q rows of the rank's attention heads | k rows | v rows of its KV heads (a KV head is
  replicated over ``tp / num_key_value_heads`` ranks when tp exceeds the KV heads), biases alike;
- ``gate_up_proj`` = the rank's rows of gate | its rows of up;
- ``o_proj`` and ``down_proj`` split by input columns, their biases whole;
- ``embed_tokens`` and an untied ``lm_head``: the vocabulary padded with zero rows to a multiple of 64,
  then split by rows;
- Mixtral's experts stacked per expert: ``experts.w13_weight`` [E, 2 x rows, hidden] = for each expert its
  rank's rows of w1 (gate) | of w3 (up), ``experts.w2_weight`` [E, hidden, columns] = each expert's
  rank's columns of w2 (down); the router whole on every rank (tensor parallelism, not expert
  parallelism);
- anything else (norms) whole on every rank.

FP8 checkpoints with one scale per output channel (compressed-tensors ``float-quantized``, strategy
``channel``: what ``hotweights shard --quantize fp8`` writes by default) fuse their ``weight_scale``
[rows, 1] with the rows they scale, so ``qkv_proj.weight_scale`` is the q | k | v scales as vLLM's loader
builds it; the scales of ``o_proj``/``down_proj`` (one per output row, which those layers do not split)
stay whole. A scale per tensor would fuse into vLLM's one-scale-per-part vector, which the loader does
not place yet, so such checkpoints are refused, as is any other quantization.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hotweights.errors import InvalidArgument

LAYOUTS = ("vllm",)  # besides "", the checkpoint's own layout

# Architectures whose vLLM model uses exactly this layout (checked against vLLM 0.32's llama.py, qwen2.py
# and mixtral.py with its fused MoE layer).
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE

QKV = re.compile(r"^(.*\.self_attn)\.(q|k|v)_proj\.(weight|bias|weight_scale)$")
GATE_UP = re.compile(r"^(.*\.mlp)\.(gate|up)_proj\.(weight|bias|weight_scale)$")
ROW_SPLIT = re.compile(r"^.*\.(o_proj|down_proj)\.(weight|bias)$")
EXPERT = re.compile(r"^(.*\.block_sparse_moe\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")
_ORDER = {"q": 0, "k": 1, "v": 2, "gate": 0, "up": 1, "w1": 0, "w3": 1, "w2": 0}


def check_layout(layout: str) -> str:
    """``layout`` when it is one the loader knows (one of ``LAYOUTS``; "" or "none" for the checkpoint's
    own, returned as ""), else InvalidArgument."""
    if layout == "none":
        return ""
    if layout and layout not in LAYOUTS:
        raise InvalidArgument(
            f"unknown layout {layout[:64]!r}; known: {list(LAYOUTS)}, or none for the checkpoint's own",
            layout=layout[:64],
        )
    return layout


def part_of(name: str) -> str:
    """q, k, v, gate or up: which slice of a fused tensor ``name`` is."""
    e = EXPERT.match(name)
    if e is not None:
        return e.group(3)
    m = QKV.match(name) or GATE_UP.match(name)
    if m is None:
        raise ValueError(f"{name} is not part of a fused tensor")
    return m.group(2)


def _order(name: str) -> tuple[int, int]:
    """Where ``name`` lies in its fused tensor: by expert, then q|k|v, gate|up or w1|w3."""
    e = EXPERT.match(name)
    return (int(e.group(2)) if e else 0, _ORDER[part_of(name)])


class Shape:
    """The facts of a model's config.json that vLLM's layout at ``tp`` ranks depends on."""

    def __init__(self, config: Mapping, tp: int) -> None:
        archs = config.get("architectures") or []
        if not isinstance(archs, list) or not any(isinstance(a, str) and a in ARCHITECTURES for a in archs):
            raise InvalidArgument(f"vLLM layout: architecture {archs} is not one of {list(ARCHITECTURES)}")
        try:
            self.heads = int(config["num_attention_heads"])
            self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
            self.head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // self.heads)
            self.vocab = int(config["vocab_size"])
            self.intermediate = int(config["intermediate_size"])
            self.hidden = int(config.get("hidden_size") or self.heads * self.head_dim)
        except (KeyError, TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
            raise InvalidArgument(f"vLLM layout: config.json lacks or mangles {exc}") from None
        sizes = {
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "intermediate_size": self.intermediate,
            "hidden_size": self.hidden,
        }
        for key, value in sizes.items():
            if value < 1:
                raise InvalidArgument(f"vLLM layout: config.json's {key} is {value}, not a positive size", key=key)
        self.tied = bool(config.get("tie_word_embeddings", False))
        experts = config.get("num_local_experts")
        try:
            self.experts = 0 if experts is None or isinstance(experts, bool) else int(experts)
            if (isinstance(experts, float) and experts != self.experts) or self.experts < 0:
                raise ValueError
        except (TypeError, ValueError, OverflowError):
            raise InvalidArgument(f"vLLM layout: config.json's num_local_experts is {experts!r}, not a count") from None
        self.tp = tp
        bad = []
        if tp < 1 or self.heads % tp:
            bad.append(f"num_attention_heads={self.heads}")
        if tp >= 1 and self.kv_heads % tp and tp % self.kv_heads:
            bad.append(f"num_key_value_heads={self.kv_heads}")
        if tp >= 1 and self.intermediate % tp:
            bad.append(f"intermediate_size={self.intermediate}")
        if bad:
            raise InvalidArgument(f"vLLM layout: tp={tp} does not divide {', '.join(bad)}")
        self.padded_vocab = -(-self.vocab // VOCAB_PADDING) * VOCAB_PADDING
        if self.padded_vocab % tp:
            raise InvalidArgument(f"vLLM layout: tp={tp} does not divide the padded vocabulary {self.padded_vocab}")

    def kv_range(self, rank: int) -> tuple[int, int]:
        """(first KV head, how many) of ``rank``."""
        if self.tp <= self.kv_heads:
            per = self.kv_heads // self.tp
            return rank * per, per
        return rank // (self.tp // self.kv_heads), 1

    def vocab_rows(self, rank: int) -> tuple[int, int]:
        """(first vocabulary row, real rows) of ``rank``; the rest of its ``padded_vocab // tp`` rows are padding."""
        per = self.padded_vocab // self.tp
        lo = rank * per
        return lo, max(min(lo + per, self.vocab) - lo, 0)

    def rows(self, name: str, rank: int) -> int | None:
        """The rows (dim 0) rank ``rank``'s part of the unsplit tensor ``name`` has in vLLM; None where
        the layout does not cut it by rows."""
        m = QKV.match(name)
        if m:
            if m.group(2) == "q":
                return self.heads // self.tp * self.head_dim
            return self.kv_range(rank)[1] * self.head_dim
        if GATE_UP.match(name):
            return self.intermediate // self.tp
        e = EXPERT.match(name)
        if e is not None:
            return None if e.group(3) == "w2" else self.intermediate // self.tp
        if name in VOCAB:
            return self.vocab_rows(rank)[1]
        return None

    def cols(self, name: str) -> int | None:
        """The columns (dim 1) a rank's part of the unsplit weight ``name`` has in vLLM; None where the
        layout does not cut it by columns."""
        e = EXPERT.match(name)
        if e is not None:
            return self.intermediate // self.tp if e.group(3) == "w2" else None
        m = ROW_SPLIT.match(name)
        if m is None or m.group(2) != "weight":
            return None
        whole = self.heads * self.head_dim if m.group(1) == "o_proj" else self.intermediate
        return whole // self.tp


def fused_name(name: str) -> str | None:
    """The vLLM parameter ``name`` is a part of (q_proj -> qkv_proj, gate_proj -> gate_up_proj); None
    for a tensor vLLM takes as it is."""
    e = EXPERT.match(name)
    if e is not None:
        return f"{e.group(1)}.{'w2' if e.group(3) == 'w2' else 'w13'}_weight"
    m = QKV.match(name) or GATE_UP.match(name)
    return None if m is None else f"{m.group(1)}.{'qkv' if m.re is QKV else 'gate_up'}_proj.{m.group(3)}"


def engine_names(names: Iterable[str]) -> dict[str, list[str]]:
    """vLLM parameter name -> the checkpoint tensors it is made of, in order."""
    out: dict[str, list[str]] = {}
    for name in names:
        fused = fused_name(name)
        if fused is not None:
            out.setdefault(fused, []).append(name)
        else:
            out[name] = [name]
    for parts in out.values():
        if len(parts) > 1:
            parts.sort(key=_order)
    return out


@dataclass(frozen=True)
class Fused:
    """One tensor the engine sees: ``parts`` (checkpoint tensors of this rank) placed back to back along
    dim 0, then ``pad_rows`` zero rows. A tensor the engine takes as it is has one part and no padding."""

    name: str
    parts: tuple[str, ...]
    pad_rows: int = 0
    # The engine's shape of it where that is not the parts' rows stacked (experts: [E, rows, cols]).
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class RankRecipe:
    """What a layout does to one rank: the tensors it fuses or pads, and the checkpoint tensors the
    engine never reads (a tied ``lm_head``: the engine uses the embedding), which are not loaded."""

    fused: tuple[Fused, ...] = ()
    dropped: frozenset[str] = frozenset()


def rank_recipe(
    layout: str,
    config: Mapping,
    world: int,
    rank: int,
    tensors: Mapping[str, tuple[str, tuple[int, ...]]],
    prepadded: bool = False,
) -> RankRecipe:
    """What ``layout`` does to rank ``rank`` (of ``world``), from the rank's checkpoint tensors
    (name -> (safetensors dtype, shape)). Raises InvalidArgument, naming every offender, where the
    checkpoint's split of a tensor is not the engine's (e.g. a vocabulary split without the engine's
    padding), a fused tensor lacks a part, its parts differ in dtype, or the checkpoint holds a fused
    tensor and its parts both. ``prepadded``: the checkpoint was written in this layout at ``world`` ranks
    (its vocabulary already padded); a checkpoint already in the engine's layout is left as it is."""
    check_layout(layout)
    if not layout:
        return RankRecipe()
    check_quantization(config)
    shape = Shape(config, world)
    problems: list[str] = []
    groups: list[Fused] = []
    dropped = frozenset(n for n in ("lm_head.weight",) if shape.tied and n in tensors)
    both = {f for f in map(fused_name, tensors) if f is not None and f in tensors}
    problems.extend(f"the checkpoint holds {f} and also its parts" for f in sorted(both))
    kept = [n for n in tensors if n not in dropped and n not in both and fused_name(n) not in both]
    for fused, parts in engine_names(kept).items():
        served: tuple[int, ...] = ()
        if len(parts) > 1 or fused != parts[0]:
            lacking = _lacking(fused, parts, shape)
            if lacking:
                problems.append(f"{fused} {lacking} on rank {rank}")
                continue
            if len({tensors[p][0] for p in parts}) > 1:
                problems.append(f"the parts of {fused} differ in dtype: {[tensors[p][0] for p in parts]}")
                continue
            trailing = {tuple(tensors[p][1][1:]) for p in parts}
            if len(trailing) > 1 or any(not tensors[p][1] for p in parts):
                problems.append(f"the parts of {fused} differ beyond dim 0: {[tensors[p][1] for p in parts]}")
                continue
            if EXPERT.match(parts[0]):
                first = tensors[parts[0]][1]
                wrong = [p for p in parts if tensors[p][1] != first]
                hidden = first[0] if fused.endswith(".w2_weight") else first[-1]
                if wrong or len(first) != 2 or hidden != shape.hidden:
                    problems.append(
                        f"the experts of {fused} are not all [rows, hidden] or [hidden, columns] alike: "
                        f"{parts[0]} {list(first)}" + (f", {wrong[0]} {list(tensors[wrong[0]][1])}" if wrong else "")
                    )
                    continue
                per_expert = len(parts) // shape.experts
                served = (shape.experts, first[0] * per_expert, *first[1:])
        pad = 0
        for p in parts:
            cols = shape.cols(p)
            have = tensors[p][1]
            if cols is not None and len(have) == 2 and have[1] != cols:
                problems.append(f"{p} has {have[1]} columns on rank {rank}; vLLM's split at tp={world} gives {cols}")
            rows = shape.rows(p, rank)
            if rows is None:
                continue
            have_rows = have[0] if have else 0
            if p in VOCAB:
                per = shape.padded_vocab // world
                if prepadded and have_rows == per:
                    continue
                pad = per - rows
            if have_rows != rows:
                where = ""
                if p in VOCAB:
                    where = f" (the vocabulary of {shape.vocab} padded to {shape.padded_vocab}, then split)"
                problems.append(
                    f"{p} has {have_rows} rows on rank {rank}; vLLM's split at tp={world} gives that rank {rows}{where}"
                )
        if pad or len(parts) > 1 or fused != parts[0]:
            groups.append(Fused(fused, tuple(parts), pad, served))
    if problems:
        raise InvalidArgument(
            f"vLLM layout: rank {rank} of this checkpoint is not split as vLLM splits it: "
            + "; ".join(problems)
            + ". Load it without a layout, or write it in vLLM's layout with python -m hotweights.vllm_layout",
            problems=problems,
        )
    return RankRecipe(tuple(groups), dropped)


def check_quantization(config: Mapping) -> str:
    """The quantization the layout places: "" (none) or "fp8-channel"; InvalidArgument for any other,
    naming what the checkpoint has."""
    qc = config.get("quantization_config")
    if not qc:
        return ""
    method = str(qc.get("quant_method", "")).lower() if isinstance(qc, Mapping) else ""
    if method == "compressed-tensors":
        groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
        weights = [g.get("weights") for g in groups]
        activations = [g.get("input_activations") for g in groups]
        if (
            weights
            and qc.get("format") == "float-quantized"
            and all(
                isinstance(w, Mapping)
                and w.get("type") == "float"
                and w.get("num_bits") == 8
                and w.get("strategy") == "channel"
                for w in weights
            )
            # static activation or KV-cache scales would be more tensors to fuse, which the layout does not place
            and all(a is None or (isinstance(a, Mapping) and a.get("dynamic") is True) for a in activations)
            and not qc.get("kv_cache_scheme")
        ):
            if config.get("num_local_experts"):
                what = "FP8 experts, whose scales the layout does not stack yet"
            else:
                return "fp8-channel"
        else:
            what = "compressed-tensors other than FP8 with one scale per output channel and dynamic activations"
    elif method == "fp8":
        what = (
            "FP8 with one scale per tensor or per block; hotweights shard --quantize fp8 writes one scale per "
            "output channel from the unquantized original"
        )
    else:
        what = f"quant_method {method or qc!r}"[:120]
    raise InvalidArgument(
        f"vLLM layout: the checkpoint's quantization ({what}) is not one the layout places; load it without a "
        f"layout (the vLLM plugin then copies it into the engine's parameters where it can)",
        quantization=method,
    )


def _lacking(fused: str, parts: list[str], shape: Shape) -> str:
    """What is wrong with the parts a fused tensor gathered ("" when they are all it needs)."""
    e = EXPERT.match(parts[0])
    if e is None:
        want = ("q", "k", "v") if "qkv_proj" in fused else ("gate", "up")
        have = tuple(part_of(p) for p in parts)
        missing = [w for w in want if w not in have]
        return f"lacks its {'/'.join(missing)} part(s)" if have != want else ""
    if not shape.experts:
        return "is made of experts, but config.json gives no num_local_experts"
    kinds = ("w2",) if fused.endswith(".w2_weight") else ("w1", "w3")
    if len(parts) != len(kinds) * shape.experts:  # counted first: a huge count in a config costs nothing
        need = len(kinds) * shape.experts
        return f"has {len(parts)} expert tensors where num_local_experts={shape.experts} needs {need}"
    expected = [f"{e.group(1)}.{i}.{k}.weight" for i in range(shape.experts) for k in kinds]
    if parts == expected:
        return ""
    missing, extra = sorted(set(expected) - set(parts)), sorted(set(parts) - set(expected))
    what = [f"lacks {missing[:4]}{' ...' if len(missing) > 4 else ''}"] if missing else []
    what += [f"has experts beyond num_local_experts={shape.experts}: {extra[:4]}"] if extra else []
    return "; ".join(what)
