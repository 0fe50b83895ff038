"""Checks a version loaded with ``--layout vllm`` from an unsplit Hugging Face directory against that
directory's safetensors, with the fused and padded tensors built here from the file by hand.

    attach_vllm_layout.py SOCKET REF HF_DIR

Prints one JSON line: the served names, which tensors differ from the expectation, which are missing
or extra, the vocabulary tensors' row counts and whether their padding rows are zero, the tensors whose
bytes lie outside the daemon's memfd mappings and the modes of the mappings they lie in.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits

PAD_TO = 64
# the checkpoint name's part -> (the fused name's part, the member's place in the fused tensor)
MEMBERS = {
    ".self_attn.q_proj.": (".self_attn.qkv_proj.", 0),
    ".self_attn.k_proj.": (".self_attn.qkv_proj.", 1),
    ".self_attn.v_proj.": (".self_attn.qkv_proj.", 2),
    ".mlp.gate_proj.": (".mlp.gate_up_proj.", 0),
    ".mlp.up_proj.": (".mlp.gate_up_proj.", 1),
}
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def expected(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in sd.items():
        hit = next((m for m in MEMBERS if m in name), None)
        if hit is None:
            out[name] = t
            continue
        fused, index = MEMBERS[hit]
        parts.setdefault(name.replace(hit, fused), {})[index] = t
    for name, by_index in parts.items():
        out[name] = torch.cat([by_index[i] for i in sorted(by_index)], dim=0)
    for name in VOCAB:
        if name in out:
            t = out[name]
            rows = -(-t.shape[0] // PAD_TO) * PAD_TO
            out[name] = torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))], dim=0)
    return out


def mapping_of(maps: list[tuple[int, int, str]], lo: int, hi: int) -> str | None:
    return next((line for a, b, line in maps if a <= lo and hi <= b), None)


def main() -> None:
    sock, ref, hf = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    sd = load_file(str(hf / "model.safetensors"))
    want = expected(sd)
    with hotweights.connect(sock).attach(ref) as w:
        with open("/proc/self/maps") as f:
            maps = []
            for line in f:
                a, b = (int(x, 16) for x in line.split()[0].split("-"))
                maps.append((a, b, line.strip()))
        got = {name: w[name] for name in w}
        outside, modes = [], set()
        for name, t in got.items():
            lo = t.data_ptr()
            m = mapping_of(maps, lo, lo + t.numel() * t.element_size())
            if m is None or "memfd:hotweights" not in m:
                outside.append(name)
            else:
                modes.add(m.split()[1])
        vocab = {}
        for name in VOCAB:
            if name in got and name in sd:
                rows = sd[name].shape[0]
                vocab[name] = {
                    "rows": got[name].shape[0],
                    "padding_zero": bool((got[name][rows:] == 0).all()),
                    "rows_equal_file": same_bits(got[name][:rows].contiguous(), sd[name]),
                }
        result = {
            "world_size": w.world_size,
            "names": sorted(got),
            "compared": len(want),
            "differ": sorted(n for n in want if n in got and not same_bits(got[n], want[n])),
            "missing": sorted(set(want) - set(got)),
            "extra": sorted(set(got) - set(want)),
            "vocab": vocab,
            "outside": sorted(outside),
            "mapping_modes": sorted(modes),
        }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
