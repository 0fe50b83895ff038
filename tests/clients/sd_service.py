"""A service under tests/support/svcmgr.py's emulated service manager, exercising
hotweightsd.persist.systemd and .statefile as the daemon does. ``python sd_service.py MODE ARGS``:

- ``notify INTERVAL``: checks the watchdog interval is INTERVAL, sends READY with a status, a
  two-line STATUS, runs the watchdog loop until SIGUSR1, then STOPPING.
- ``store-two OUT``: stores two memfds with known contents (their hex written to OUT as JSON),
  READY, then waits for a signal.
- ``read-back OUT``: writes to OUT what came back from the store (LISTEN_* before and after, the
  fds, their close-on-exec flags and contents).
- ``claim-extra-fd``: claims two passed fds where one came, and prints the error.
- ``store-with-state STATE``: stores two memfds and a state file listing both, READY, waits.
- ``check-state STATE``: checks the fds that came back against STATE and prints the error.
"""

import asyncio
import json
import os
import signal
import sys

from hotweightsd.persist import statefile, systemd


def notify(interval: float) -> None:
    assert systemd.watchdog_interval() == interval, systemd.watchdog_interval()

    async def main() -> None:
        stop = asyncio.Event()
        # set before READY: the test signals once it has seen the pings it waits for
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
        assert systemd.ready("serving 0 models")
        assert systemd.status("loading\nllama")
        await asyncio.wait_for(systemd.watchdog_loop(stop), 300)

    asyncio.run(main())
    assert systemd.stopping()


def store_two(out: str) -> None:
    blobs = {}
    for name, data in (("model-a.r0", b"weights of a" * 1000), ("model-b.r1", os.urandom(5000))):
        fd = os.memfd_create(name)
        os.write(fd, data)
        assert systemd.store_fds(name, [fd])
        blobs[name] = data.hex()
    with open(out, "w") as f:
        json.dump(blobs, f)
    systemd.ready()
    signal.pause()


def read_back(out: str) -> None:
    keys = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
    before = {k: os.environ.get(k) for k in keys}
    fds = systemd.listen_fds()
    got = {
        "before": before,
        "fds": fds,
        "after": [k for k in keys if k in os.environ],
        "cloexec": [not os.get_inheritable(fd) for fd_list in fds.values() for fd in fd_list],
        "data": {name: os.pread(f[0], 1 << 20, 0).hex() for name, f in fds.items()},
    }
    with open(out, "w") as f:
        json.dump(got, f)


def claim_extra_fd() -> None:
    os.environ.update(LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
    try:
        systemd.listen_fds()
    except Exception as exc:
        print(type(exc).__name__, exc)


def store_with_state(state: str) -> None:
    for name in ("m@1.r0", "m@1.r1"):
        assert systemd.store_fds(name, [os.memfd_create(name)])
    statefile.save(state, {"fds": {"m@1.r0": 1, "m@1.r1": 1}})
    systemd.ready()
    signal.pause()


def check_state(state: str) -> None:
    doc = statefile.load(state)
    mismatch = statefile.match_fds(doc["fds"], systemd.listen_fds())
    print("match" if mismatch.ok else f"mismatch: {mismatch.describe()}")


mode, args = sys.argv[1], sys.argv[2:]
if mode == "notify":
    notify(float(args[0]))
elif mode == "store-two":
    store_two(args[0])
elif mode == "read-back":
    read_back(args[0])
elif mode == "claim-extra-fd":
    claim_extra_fd()
elif mode == "store-with-state":
    store_with_state(args[0])
elif mode == "check-state":
    check_state(args[0])
else:
    sys.exit(f"unknown mode {mode!r}")
