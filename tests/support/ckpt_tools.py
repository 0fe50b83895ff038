"""Writing checkpoints for tests: real ones through safetensors, broken ones by hand."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file


def mixed_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "f32": torch.randn(17, 33, generator=g),
        "f16": torch.randn(64, 8, generator=g).half(),
        "bf16": torch.randn(3, 5, 7, generator=g).bfloat16(),
        "f8_e4m3": torch.randn(32, 16, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(9, generator=g).to(torch.float8_e5m2),
        "i64": torch.randint(-(2**40), 2**40, (11,), generator=g),
        "i8": torch.randint(-100, 100, (5, 5), dtype=torch.int8, generator=g),
        "bool": torch.rand(13, generator=g) > 0.5,
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "empty": torch.empty(0, 4),
        "big": torch.randn(1024, 1024, generator=g),
    }


def write_model(path: Path, tensors: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors if tensors is not None else mixed_tensors(seed), str(path))
    return path


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A safetensors-shaped file with exactly the header and data given (valid or not)."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(body) if header_len is None else header_len
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bytes(a.contiguous().reshape(-1).view(torch.uint8).numpy()) == bytes(
        b.contiguous().reshape(-1).view(torch.uint8).numpy()
    )


def layered_tensors(layers: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small decoder stack: each layer the same names and shapes (q and o, gate and up, the two norms
    share a shape), plus the outer embedding, final norm and head, as real checkpoints are laid out."""
    g = torch.Generator().manual_seed(seed)
    layer = {
        "input_layernorm.weight": (32,),
        "post_attention_layernorm.weight": (32,),
        "self_attn.q_proj.weight": (32, 32),
        "self_attn.k_proj.weight": (8, 32),
        "self_attn.v_proj.weight": (8, 32),
        "self_attn.o_proj.weight": (32, 32),
        "self_attn.q_proj.bias": (32,),
        "mlp.gate_proj.weight": (64, 32),
        "mlp.up_proj.weight": (64, 32),
        "mlp.down_proj.weight": (32, 64),
    }
    out = {
        f"model.layers.{i}.{k}": torch.randn(s, generator=g).bfloat16() for i in range(layers) for k, s in layer.items()
    }
    out["model.embed_tokens.weight"] = torch.randn(100, 32, generator=g).bfloat16()
    out["lm_head.weight"] = torch.randn(100, 32, generator=g).bfloat16()
    out["model.norm.weight"] = torch.randn(32, generator=g).bfloat16()
    return out


def versioned_model(root: Path, n: int, size: int = 256) -> Path:
    """root/v{n}/model.safetensors: a small checkpoint whose every value encodes its version number ``n``."""
    return write_model(
        root / f"v{n}" / "model.safetensors",
        {
            "marker": torch.tensor([n], dtype=torch.int64),
            "w": torch.full((size, size), float(n)),
        },
    )
