"""SOCKET REF: attaches REF as holder "restart-test", prints ``attached``; after a line on stdin (the
daemon restarted meanwhile) checks the tensors are unchanged and prints ``same-after-restart
<relets>``; after another line releases."""

import sys

import hotweights

c = hotweights.connect(sys.argv[1])
w = c.attach(sys.argv[2], holder="restart-test")


def digest() -> dict:
    return {k: float(v.double().sum()) if v.dtype.is_floating_point else int(v.long().sum()) for k, v in w.items()}


before = digest()
print("attached", flush=True)
sys.stdin.readline()
assert digest() == before
print("same-after-restart", w._lease.relets, flush=True)
sys.stdin.readline()
w.release()
