"""SOCKET REF FILE: attaches REF and checks every tensor bit for bit against the safetensors FILE.
Prints ``OK <tensors>``."""

import sys

from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits

sock, ref_name, path = sys.argv[1:4]
ref = load_file(path)
with hotweights.connect(sock).attach(ref_name) as w:
    assert sorted(w) == sorted(ref), (sorted(w), sorted(ref))
    for name, t in w.items():
        assert same_bits(t, ref[name]), name
print("OK", len(ref))
