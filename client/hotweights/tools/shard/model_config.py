"""The few config.json facts that sharding and planning depend on, read once and checked.

Hugging Face configs spell the same thing several ways across versions (``torch_dtype`` and
``dtype``; ``head_dim`` absent, null or set; ``num_local_experts`` and ``num_experts``), so every
consumer reads them through here instead of poking at the dict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotweights.errors import BadCheckpoint, InvalidArgument, NotFound

CONFIG_NAME = "config.json"

# Bytes per element of the dtypes a config can name as the model's precision.
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "float8_e4m3fn": 1}


@dataclass
class ModelConfig:
    raw: dict[str, Any]
    path: Path | None = None
    architecture: str = ""
    model_type: str = ""
    hidden_size: int = 0
    num_hidden_layers: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0
    tie_word_embeddings: bool | None = None  # None: the config does not say
    torch_dtype: str = "bfloat16"
    max_position_embeddings: int | None = None
    num_experts: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = False  # biases on q/k/v (Qwen2 always; Llama-family with attention_bias)
    o_bias: bool = False  # a bias on o_proj (Llama-family attention_bias; never Qwen2)
    mlp_bias: bool = False  # biases on gate/up/down (Llama's mlp_bias)
    quantization_config: dict[str, Any] | None = None
    missing: list[str] = field(default_factory=list)

    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES.get(self.torch_dtype, 2)

    def require(self, *names: str) -> None:
        """Fail naming the config fields a computation needs but this config lacks."""
        absent = [n for n in names if n in self.missing]
        if absent:
            where = self.path or "config.json"
            raise BadCheckpoint(f"{where}: missing {', '.join(absent)}", path=str(where), fields=absent)


def load_config(path: str | Path) -> ModelConfig:
    """Read a model directory's config.json, or a config.json file itself."""
    path = Path(path).expanduser()
    cfg_path = path / CONFIG_NAME if path.is_dir() else path
    if not cfg_path.exists():
        if path.is_dir():
            raise BadCheckpoint(
                f"{path}: no {CONFIG_NAME} (it names the architecture, head counts and vocabulary that "
                f"decide how tensors are split)",
                path=str(path),
            )
        raise NotFound(f"{path}: no such file or directory", path=str(path))
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadCheckpoint(f"{cfg_path}: cannot read it as JSON: {exc}", path=str(cfg_path)) from None
    if not isinstance(raw, dict):
        raise BadCheckpoint(f"{cfg_path}: not a JSON object", path=str(cfg_path))
    return parse_config(raw, cfg_path)


def parse_config(raw: dict[str, Any], path: Path | None = None) -> ModelConfig:
    cfg = ModelConfig(raw=raw, path=path)
    archs = raw.get("architectures") or []
    cfg.architecture = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    cfg.model_type = str(raw.get("model_type") or "")

    def num(name: str, *aliases: str, default: int | None = None) -> int:
        for key in (name, *aliases):
            value = raw.get(key)
            if value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise BadCheckpoint(
                        f"{path or 'config.json'}: {key} = {value!r} is not a non-negative integer",
                        path=str(path),
                        field=key,
                    )
                return value
        if default is None:
            cfg.missing.append(name)
            return 0
        return default

    cfg.hidden_size = num("hidden_size")
    cfg.num_hidden_layers = num("num_hidden_layers")
    cfg.num_attention_heads = num("num_attention_heads")
    cfg.num_key_value_heads = num("num_key_value_heads", default=cfg.num_attention_heads)
    heads = cfg.num_attention_heads
    cfg.head_dim = num("head_dim", default=(cfg.hidden_size // heads) if heads else 0)
    cfg.vocab_size = num("vocab_size")
    cfg.intermediate_size = num("intermediate_size", default=0)
    cfg.num_experts = num("num_local_experts", "num_experts", default=0)
    cfg.moe_intermediate_size = num("moe_intermediate_size", default=cfg.intermediate_size)
    cfg.shared_expert_intermediate_size = num("shared_expert_intermediate_size", default=0)
    max_pos = raw.get("max_position_embeddings")
    cfg.max_position_embeddings = max_pos if isinstance(max_pos, int) and max_pos > 0 else None
    tie = raw.get("tie_word_embeddings")
    cfg.tie_word_embeddings = None if tie is None else bool(tie)
    dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    qwen2 = cfg.model_type in ("qwen2", "qwen2_moe")
    cfg.qkv_bias = bool(raw.get("attention_bias") or raw.get("qkv_bias") or qwen2)
    cfg.o_bias = bool(raw.get("attention_bias")) and not qwen2
    cfg.mlp_bias = bool(raw.get("mlp_bias"))
    qc = raw.get("quantization_config")
    cfg.quantization_config = qc if isinstance(qc, dict) else None
    return cfg


def check_tp(tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise InvalidArgument(f"tp must be a positive integer, not {tp!r}", tp=tp)


def divisors(n: int, most: int | None = None) -> list[int]:
    """The divisors of ``n`` in ascending order (the first ``most`` of them), found by trial division up
    to its square root: a mistyped 10-digit vocab_size costs microseconds, not minutes."""
    if n < 1:
        return []
    low: list[int] = []
    high: list[int] = []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            low.append(d)
            if d != n // d:
                high.append(n // d)
            if most is not None and len(low) >= most:
                return low[:most]  # each of the first ``most`` divisors is at most isqrt(n) here
    found = low + high[::-1]
    return found if most is None else found[:most]
