"""SOCKET CHECKPOINT, run with CUDA_VISIBLE_DEVICES naming the daemon's second GPU only: attaches
"tp2" rank 1, checks every tensor is on this process's cuda:0 and bit-equal to CHECKPOINT's
model-rank-1-* files. Prints ``OK <tensors>``."""

import glob
import sys

import torch
from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits

want = {}
for f in sorted(glob.glob(sys.argv[2] + "/model-rank-1-*.safetensors")):
    want.update(load_file(f))
assert torch.cuda.device_count() == 1
with hotweights.connect(sys.argv[1]).attach("tp2", rank=1) as w:
    for k, t in w.items():
        assert t.device == torch.device("cuda", 0), t.device
        assert same_bits(t.cpu(), want[k]), k
print("OK", len(w))
