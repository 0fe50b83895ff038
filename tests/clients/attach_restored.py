"""SOCKET: attaches "prod" and "beta@v7" and checks them bit for bit against mixed_tensors(1) and
mixed_tensors(2), what the restart test loaded before the restart. Prints ``ok``."""

import sys

import hotweights
from support.ckpt_tools import mixed_tensors, same_bits

c = hotweights.connect(sys.argv[1])
for ref, seed in (("prod", 1), ("beta@v7", 2)):
    with c.attach(ref) as w:
        want = mixed_tensors(seed)
        assert all(same_bits(w[k], want[k]) for k in want), ref
print("ok")
