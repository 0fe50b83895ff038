"""Imports hotweights.testing and the demo with torch and pytest unimportable; prints ``ok``."""

import sys

sys.modules["torch"] = sys.modules["pytest"] = None

import hotweights.testing  # noqa: E402
import hotweights.tools.demo  # noqa: E402,F401

print("ok")
