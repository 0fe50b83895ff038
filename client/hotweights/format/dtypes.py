"""Safetensors dtype strings, their sizes, and the torch dtype each is served as."""

from __future__ import annotations

from dataclasses import dataclass

from hotweights.errors import BadCheckpoint


@dataclass(frozen=True)
class DType:
    name: str  # safetensors spelling
    bits: int  # bits per element
    torch_name: str  # attribute of the torch module the client builds; "uint8" where torch lacks it


# Sub-byte and exotic types are stored as raw bytes; the table entry keeps the real dtype so a
# serving process can reinterpret them.
_TABLE = [
    DType("BOOL", 8, "bool"),
    DType("U8", 8, "uint8"),
    DType("I8", 8, "int8"),
    DType("F8_E5M2", 8, "float8_e5m2"),
    DType("F8_E4M3", 8, "float8_e4m3fn"),
    DType("F8_E8M0", 8, "float8_e8m0fnu"),
    DType("I16", 16, "int16"),
    DType("U16", 16, "uint16"),
    DType("F16", 16, "float16"),
    DType("BF16", 16, "bfloat16"),
    DType("I32", 32, "int32"),
    DType("U32", 32, "uint32"),
    DType("F32", 32, "float32"),
    DType("F64", 64, "float64"),
    DType("I64", 64, "int64"),
    DType("U64", 64, "uint64"),
    DType("C64", 64, "complex64"),
    DType("F4", 4, "uint8"),
    DType("F6_E2M3", 6, "uint8"),
    DType("F6_E3M2", 6, "uint8"),
]
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}


def lookup(name: str, *, where: str = "") -> DType:
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(DTYPES))
        raise BadCheckpoint(f"{where}unknown dtype {name!r} (known: {known})", dtype=str(name)) from None


def nbytes_for(dtype: DType, shape: tuple[int, ...]) -> int:
    numel = 1
    for d in shape:
        numel *= d
    total_bits = numel * dtype.bits
    return (total_bits + 7) // 8


def torch_dtype(name: str):
    """The torch dtype a client builds for a safetensors dtype (uint8 where torch has none)."""
    import torch

    entry = DTYPES[name]
    return getattr(torch, entry.torch_name, None) or torch.uint8


def served_dtype_name(name: str) -> str:
    """The torch dtype name a client should build; a client whose torch lacks it serves raw bytes.

    Decided without importing torch: the daemon never needs it.
    """
    return DTYPES[name].torch_name
