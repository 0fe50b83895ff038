"""SOCKET ALIAS: watches ALIAS, prints ``watching``, then one JSON line per event (kind, version,
alias, the daemon's event time and the time this process saw it) until ALIAS_MOVED."""

import json
import sys
import time

import hotweights

c = hotweights.connect(sys.argv[1])
watch = c.watch(sys.argv[2])
# The daemon sends the stream's initial metadata once it has subscribed it: only then can no event
# the test causes next be missed.
watch._call.initial_metadata()
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
