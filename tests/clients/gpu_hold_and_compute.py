"""SOCKET REF (cuda backend): attaches REF, computes with ``big``, prints ``attached``; after a line
on stdin (the daemon was killed meanwhile) computes again, checks the result is unchanged and
prints ``still-computing``."""

import sys

import hotweights

w = hotweights.connect(sys.argv[1]).attach(sys.argv[2])
x = w["big"]


def compute() -> float:
    return float((x @ x.T).double().sum())


first = compute()
print("attached", flush=True)
sys.stdin.readline()
assert compute() == first
assert float(w["f32"].double().sum()) == float(w["f32"].double().sum())
print("still-computing", flush=True)
