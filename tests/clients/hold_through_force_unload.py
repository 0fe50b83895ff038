"""SOCKET CHECKPOINT: attaches "m", prints ``attached``, waits for a line on stdin (the test
force-unloads meanwhile), then checks that the mapped ``big`` still equals the file's and prints
``still-valid``."""

import sys

import torch
from safetensors.torch import load_file

import hotweights

c = hotweights.connect(sys.argv[1])
ref = load_file(sys.argv[2])
w = c.attach("m")
t = w["big"]
print("attached", flush=True)
sys.stdin.readline()
assert torch.equal(t, ref["big"])
print("still-valid", flush=True)
