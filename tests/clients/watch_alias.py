"""SOCKET ALIAS: watches ALIAS, prints ``watching``, then one JSON line per event (kind, version,
alias, the daemon's event time and the time this process saw it) until ALIAS_MOVED."""

import json
import sys
import time

import hotweights

c = hotweights.connect(sys.argv[1])
# Subscribed once this returns: no event the test causes next can be missed.
watch = c.watch(sys.argv[2]).wait_subscribed()
print("watching", flush=True)
for ev in watch:
    kind = ev.DESCRIPTOR.fields_by_name["kind"].enum_type.values_by_number[ev.kind].name
    seen = time.time()
    print(
        json.dumps({"kind": kind, "version": ev.version, "alias": ev.alias, "t_event": ev.time_unix, "t_seen": seen}),
        flush=True,
    )
    if kind == "ALIAS_MOVED":
        break
