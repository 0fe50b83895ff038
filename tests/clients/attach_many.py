"""SOCKET REF N [wait]: attaches REF and releases it, N times one after the other, each time reading its
tensor ``f32``. With ``wait``, prints ``ready`` once connected and starts when a line comes on stdin.
Prints one JSON line: ``ok`` (attaches that succeeded), ``errors`` (``Class: message`` of the others)
``latencies`` (seconds per attach, lease to mapped tensors) and ``slowest`` (where the slowest spent them)."""

import json
import sys
import time

import hotweights
import hotweights.attach  # torch is imported here, before the clock starts, not in the first attach

socket_path, ref, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = hotweights.connect(socket_path, timeout=60)
c.status()  # connected before the clock starts: the attaches are what is measured
if sys.argv[4:] == ["wait"]:
    print("ready", flush=True)
    sys.stdin.readline()
ok, failed, latencies, slowest = 0, [], [], {}
for _ in range(n):
    t0 = time.perf_counter()
    try:
        with c.attach(ref) as w:
            latencies.append(time.perf_counter() - t0)
            if latencies[-1] == max(latencies):
                slowest = w.timings
            assert float(w["f32"].sum()) == float(w["f32"].sum())
            ok += 1
    except hotweights.HotweightsError as exc:
        failed.append(f"{type(exc).__name__}: {exc}")
print(json.dumps({"ok": ok, "errors": failed, "latencies": latencies, "slowest": slowest}), flush=True)
