"""Prints the files ``hotweights`` and ``hotweightsd`` are imported from, one line, space-separated."""

import hotweights
import hotweightsd

print(hotweights.__file__, hotweightsd.__file__)
