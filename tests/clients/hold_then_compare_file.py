"""SOCKET REF FILE: attaches REF, prints ``attached``; after a line on stdin (the test unloaded
another version meanwhile) reads every tensor and checks it bit for bit against the safetensors FILE,
prints ``OK <tensors>`` and releases."""

import sys

from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits

sock, ref_name, path = sys.argv[1:4]
c = hotweights.connect(sock)
w = c.attach(ref_name)
print("attached", flush=True)
sys.stdin.readline()
ref = load_file(path)
assert sorted(w) == sorted(ref), (sorted(w), sorted(ref))
for name, t in w.items():
    assert same_bits(t, ref[name]), name
w.release()
print("OK", len(ref), flush=True)
