"""SOCKET REF: attaches REF, reads a tensor, prints ``attached`` and holds the lease until its
stdin closes (the test kills it, or ends)."""

import sys

import hotweights

c = hotweights.connect(sys.argv[1])
w = c.attach(sys.argv[2])
assert float(w["f32"].sum()) == float(w["f32"].sum())
print("attached", flush=True)
sys.stdin.read()
