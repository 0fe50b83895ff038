"""SOCKET STOPFILE: attaches and releases "prod" in a loop, checking each mapping is one whole
version, until STOPFILE exists. Prints ``started`` after its first good attach, ``FAIL ...`` per
failure, and ``DONE <good> <failed>`` at the end."""

import os
import sys

import hotweights

c = hotweights.connect(sys.argv[1])
stop = sys.argv[2]
ok = bad = 0
while not os.path.exists(stop):
    try:
        with c.attach("prod") as w:
            n = int(w["marker"][0])
            assert float(w["w"][0, 0]) == float(n) and w.version == f"v{n}"
            ok += 1
            if ok == 1:
                print("started", flush=True)
    except Exception as exc:
        bad += 1
        print("FAIL", type(exc).__name__, exc, flush=True)
print("DONE", ok, bad, flush=True)
