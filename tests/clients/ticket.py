"""SOCKET reuse | SOCKET expire SECONDS: takes a lease on "m" and a ticket for its fds, then uses the
ticket twice (reuse) or once after SECONDS (expire), then a forged ticket. Prints ``first ok <n>``,
``second ok`` or ``TicketInvalid: <message>``, and ``forged refused``."""

import sys
import time

import hotweights
from hotweights import errors
from hotweights.attach import LeaseStream
from hotweights.wire.fdproto import fetch_fds
from hotweights.wire.pb import pb

c = hotweights.connect(sys.argv[1])
mode = sys.argv[2]
lease = LeaseStream(c.stub, "m", "ticket-test", None)
h = c.stub.GetHandles(pb.GetHandlesRequest(lease_id=lease.granted.lease_id, lease_key=lease.granted.lease_key, rank=0))
if mode == "reuse":
    fds = fetch_fds(h.fd_socket, h.ticket, 1)
    print("first ok", len(fds))
else:
    time.sleep(float(sys.argv[3]))  # outlive the ticket: time passing is the condition
try:
    fetch_fds(h.fd_socket, h.ticket, 1)
    print("second ok")
except errors.TicketInvalid as exc:
    print("TicketInvalid:", exc)
try:
    fetch_fds(h.fd_socket, "0" * 32, 1)
except errors.TicketInvalid:
    print("forged refused")
lease.release()
