"""Tensor-parallel rules: which tensors are split along which dimension, and which are replicated.

A rule maps a tensor name pattern to a split dimension (or replication) and names the unit a split
must keep whole: attention heads, KV heads, vocabulary rows, or nothing in particular. The layout
follows Megatron-style tensor parallelism, the one vLLM and SGLang load:
- column-parallel (split the output rows, dim 0): q/k/v, gate/up, MoE expert w1/w3, lm_head;
- row-parallel (split the input columns, dim 1): o_proj, down_proj, MoE expert w2; their biases are
  replicated because they are added once after the all-reduce;
- vocab-parallel embeddings (dim 0); norms and MoE routers replicated.

Every tensor must be covered: a tensor that no rule names is an error, never a silent replication,
because a replicated tensor that should have been split loads fine and computes garbage.

Splits are exact: attention splits need tp to divide the head count, KV splits need tp to divide
the KV heads or be a multiple of them (then each KV head is replicated), and the vocabulary is never
padded (padding would change the tensors and break the bit-exact round trip; serving engines pad at
load time), so tp must divide vocab_size. Anything else is refused with the valid tp values.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotweights.errors import InvalidArgument
from hotweights.tools.shard.model_config import ModelConfig

# What a split must keep whole; each unit has its own divisibility rule (see placement.py).
UNITS = ("plain", "heads", "kv_heads", "vocab")


@dataclass(frozen=True)
class Rule:
    pattern: str  # as the user or this module wrote it, for messages
    regex: re.Pattern[str]
    split_dim: int | None  # None: every rank gets the whole tensor
    unit: str = "plain"
    quantize: bool = False  # the weight of a linear layer: eligible for FP8
    origin: str = "built-in"

    @property
    def replicated(self) -> bool:
        return self.split_dim is None


def _rule(pattern: str, split_dim: int | None, unit: str = "plain", quantize: bool = False) -> Rule:
    return Rule(pattern, re.compile(pattern), split_dim, unit, quantize)


_LAYER = r"model\.layers\.\d+\."


def _column(module: str, unit: str = "plain") -> list[Rule]:
    # A column-parallel bias is split with its output rows.
    return [_rule(module + r"\.weight", 0, unit, quantize=True), _rule(module + r"\.bias", 0, unit)]


def _row(module: str, unit: str = "plain") -> list[Rule]:
    # A row-parallel bias is added after the all-reduce: every rank holds it, one adds it.
    return [_rule(module + r"\.weight", 1, unit, quantize=True), _rule(module + r"\.bias", None)]


_DENSE: list[Rule] = [
    _rule(r"model\.embed_tokens\.weight", 0, "vocab"),
    # lm_head stays in the source precision under --quantize fp8, as vLLM's FP8 checkpoints keep it.
    _rule(r"lm_head\.weight", 0, "vocab"),
    _rule(r"model\.norm\.weight", None),
    _rule(_LAYER + r"(input_layernorm|post_attention_layernorm)\.weight", None),
    *_column(_LAYER + r"self_attn\.q_proj", "heads"),
    *_column(_LAYER + r"self_attn\.[kv]_proj", "kv_heads"),
    *_row(_LAYER + r"self_attn\.o_proj", "heads"),
    _rule(_LAYER + r"self_attn\.[qk]_norm\.weight", None),  # Qwen3: per head_dim, shared by all heads
    _rule(_LAYER + r"self_attn\.rotary_emb\.inv_freq", None),  # a buffer older checkpoints saved
    *_column(_LAYER + r"mlp\.(gate|up)_proj"),
    *_row(_LAYER + r"mlp\.down_proj"),
]

_MIXTRAL: list[Rule] = [
    _rule(_LAYER + r"block_sparse_moe\.gate\.weight", None),  # the router: every rank routes every token
    *_column(_LAYER + r"block_sparse_moe\.experts\.\d+\.w[13]"),
    *_row(_LAYER + r"block_sparse_moe\.experts\.\d+\.w2"),
]

_QWEN_MOE: list[Rule] = [
    _rule(_LAYER + r"mlp\.gate\.weight", None),  # the router
    _rule(_LAYER + r"mlp\.shared_expert_gate\.weight", None),  # one sigmoid gate, [1, hidden]
    *_column(_LAYER + r"mlp\.(experts\.\d+|shared_expert)\.(gate|up)_proj"),
    *_row(_LAYER + r"mlp\.(experts\.\d+|shared_expert)\.down_proj"),
]

ARCHITECTURES: dict[str, list[Rule]] = {
    "LlamaForCausalLM": _DENSE,
    "MistralForCausalLM": _DENSE,
    "Qwen2ForCausalLM": _DENSE,
    "Qwen3ForCausalLM": _DENSE,
    "MixtralForCausalLM": _DENSE + _MIXTRAL,
    "Qwen2MoeForCausalLM": _DENSE + _QWEN_MOE,
    "Qwen3MoeForCausalLM": _DENSE + _QWEN_MOE,
}


class RuleSet:
    """User rules first (they override), then the architecture's built-in rules; first match wins."""

    def __init__(self, architecture: str, rules: list[Rule]) -> None:
        self.architecture = architecture
        self.rules = rules

    def match(self, name: str) -> Rule | None:
        for rule in self.rules:
            if rule.regex.fullmatch(name):
                return rule
        return None


def resolve_rules(config: ModelConfig, rules_file: str | Path | None = None) -> RuleSet:
    user = load_rules_file(rules_file) if rules_file is not None else []
    builtin = ARCHITECTURES.get(config.architecture)
    if builtin is None and not user:
        known = ", ".join(sorted(ARCHITECTURES))
        arch = config.architecture or "(config.json names no architectures)"
        raise InvalidArgument(
            f"unknown architecture {arch!r}: hotweights shard has tensor-parallel rules for {known}; "
            f'pass --rules FILE (TOML or JSON: tensor name pattern -> split dim or "replicate") to shard it',
            architecture=config.architecture,
        )
    return RuleSet(config.architecture, user + (builtin or []))


def load_rules_file(path: str | Path) -> list[Rule]:
    """Read user rules.

    Either a flat table or one under ``rules``; keys are glob patterns (``*`` also matches dots) or
    ``re:``-prefixed regular expressions; values are a split dimension, ``"replicate"``, or a table
    ``{split = 0 | "replicate", unit = "heads" | "kv_heads" | "vocab" | "plain", quantize = bool}``.
    """
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as exc:
        raise InvalidArgument(f"rules file {path}: cannot read it: {exc.strerror or exc}", path=str(path)) from None
    try:
        doc = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise InvalidArgument(f"rules file {path}: not valid {kind}: {exc}", path=str(path)) from None
    table = doc.get("rules", doc) if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise InvalidArgument(
            f'rules file {path}: expected a table of pattern = split dim or "replicate"', path=str(path)
        )
    return [_user_rule(path, pattern, value) for pattern, value in table.items()]


def _user_rule(path: Path, pattern: str, value: Any) -> Rule:
    where = f"rules file {path}: {pattern!r}: "
    spec = value if isinstance(value, dict) else {"split": value}
    unknown = set(spec) - {"split", "unit", "quantize"}
    if unknown:
        raise InvalidArgument(f"{where}unknown key(s) {sorted(unknown)} (known: split, unit, quantize)", path=str(path))
    split = spec.get("split")
    if split == "replicate":
        dim = None
    elif isinstance(split, int) and not isinstance(split, bool) and split >= 0:
        dim = split
    else:
        raise InvalidArgument(
            f'{where}split must be a dimension (0, 1, ...) or "replicate", not {split!r}', path=str(path)
        )
    unit = spec.get("unit", "plain")
    if unit not in UNITS:
        raise InvalidArgument(f"{where}unit must be one of {', '.join(UNITS)}, not {unit!r}", path=str(path))
    quantize = spec.get("quantize", False)
    if not isinstance(quantize, bool):
        raise InvalidArgument(f"{where}quantize must be true or false", path=str(path))
    if pattern.startswith("re:"):
        source = pattern[3:]
    else:
        # fnmatch's translation lets '*' cross dots, which is what a user writing layers.*.x means.
        source = fnmatch.translate(pattern)
    try:
        regex = re.compile(source)
    except re.error as exc:
        raise InvalidArgument(f"{where}not a valid pattern: {exc}", path=str(path)) from None
    return Rule(pattern, regex, dim, unit, quantize, origin=str(path))
