"""SOCKET PATH REF RANK (cuda backend): attaches REF's RANK and checks each tensor is on cuda:RANK
and bit-equal to PATH (a file, or a directory's model-rank-RANK-* or *.safetensors files).
Prints ``OK <tensors>``."""

import glob
import os
import sys

import torch
from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits

sock, path, ref, rank = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
files = (
    [path]
    if path.endswith(".safetensors")
    else (
        sorted(glob.glob(os.path.join(path, f"model-rank-{rank}-*.safetensors")))
        or sorted(glob.glob(os.path.join(path, "*.safetensors")))
    )
)
want = {}
for f in files:
    want.update(load_file(f, device=f"cuda:{rank}"))
with hotweights.connect(sock).attach(ref, rank=rank) as w:
    assert sorted(w) == sorted(want)
    for k, t in w.items():
        assert t.device == torch.device("cuda", rank), (k, t.device)
        assert same_bits(t.cpu(), want[k].cpu()), k
    print("OK", len(w), flush=True)
