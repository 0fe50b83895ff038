"""SOCKET: attaches "ghost", which no daemon holds; prints ``NotFound: <message>``."""

import sys

import hotweights
from hotweights.errors import NotFound

try:
    hotweights.connect(sys.argv[1]).attach("ghost")
except NotFound as exc:
    print("NotFound:", exc)
