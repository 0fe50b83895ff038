"""SOCKET REF: attaches REF and prints ``<version> <marker>``."""

import sys

import hotweights

with hotweights.connect(sys.argv[1]).attach(sys.argv[2]) as w:
    print(w.version, int(w["marker"][0]))
