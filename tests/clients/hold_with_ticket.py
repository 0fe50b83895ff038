"""SOCKET REF: opens a lease on REF, asks GetHandles for a ticket with the lease's key and prints one
JSON line (``lease_id``, ``ticket``, ``fd_socket``). Then, at each line on stdin: ``fetch`` trades the
ticket for the fds and prints ``fetched N`` (or ``Class: message``); the end of stdin releases the lease."""

import json
import os
import sys

import hotweights
from hotweights.attach import LeaseStream
from hotweights.wire.fdproto import fetch_fds
from hotweights.wire.pb import pb

c = hotweights.connect(sys.argv[1])
lease = LeaseStream(c.stub, sys.argv[2], "binding-test", None)
g = lease.granted
h = c.stub.GetHandles(pb.GetHandlesRequest(lease_id=g.lease_id, lease_key=g.lease_key, rank=0))
print(json.dumps({"lease_id": g.lease_id, "ticket": h.ticket, "fd_socket": h.fd_socket}), flush=True)
for line in sys.stdin:
    if line.strip() == "fetch":
        try:
            fds = fetch_fds(h.fd_socket, h.ticket, len(h.allocations))
            print("fetched", len(fds), flush=True)
            for fd in fds:
                os.close(fd)
        except hotweights.HotweightsError as exc:
            print(f"{type(exc).__name__}: {exc}", flush=True)
lease.release()
