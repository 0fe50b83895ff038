"""SOCKET CHECKPOINT [REFERENCE]: loads CHECKPOINT as "mixed", attaches it and checks every tensor bit for
bit against safetensors (REFERENCE: the same file where this process sees it, when the daemon sees it
under another path), and that each is a read-only shared mapping of the daemon's memfd (zero copy).
Prints ``OK <tensors>``."""

import sys

from safetensors.torch import load_file

import hotweights
from support.ckpt_tools import same_bits


def mapping_of(maps: list[str], ptr: int) -> str | None:
    for line in maps:
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= ptr < hi:
            return line
    return None


sock, path = sys.argv[1], sys.argv[2]
c = hotweights.connect(sock)
c.load("mixed", path)
ref = load_file(sys.argv[3] if len(sys.argv) > 3 else path)
with c.attach("mixed") as w:
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    assert sorted(w) == sorted(ref), (sorted(w), sorted(ref))
    for name, t in w.items():
        assert same_bits(t, ref[name]), name
        if t.numel() == 0:
            continue  # an empty tensor has no bytes to point at
        m = mapping_of(maps, t.data_ptr())
        assert m is not None and "memfd:hotweights" in m, (name, m)
        assert " r--s " in m, m  # shared and read-only: the daemon's pages, not a copy
print("OK", len(ref))
