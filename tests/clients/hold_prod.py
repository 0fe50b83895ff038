"""SOCKET: attaches "prod" and prints ``<version> <marker>``; after a line on stdin prints
``<version> <marker> <mean of w>`` again from the same mapping; after another line releases and
prints ``released``."""

import sys

import hotweights

c = hotweights.connect(sys.argv[1])
w = c.attach("prod")
print(w.version, int(w["marker"][0]), flush=True)
sys.stdin.readline()
print(w.version, int(w["marker"][0]), float(w["w"].mean()), flush=True)
sys.stdin.readline()
w.release()
print("released", flush=True)
