"""SOCKET ALIAS: attaches ALIAS, prints ``attached``; after a line on stdin (the daemon restarted
meanwhile) waits until its lease was taken again and prints ``relet``; after another line (the alias
moved) waits for the move and prints ``moved <alias> <old version> <new version>``; then releases."""

import contextlib
import sys
import threading

import hotweights
from hotweights.testing import wait_until

moves: list = []
moved = threading.Event()


def on_move(ev) -> None:
    moves.append(ev)
    moved.set()


c = hotweights.connect(sys.argv[1])
w = c.attach(sys.argv[2], holder="follower", on_alias_moved=on_move)
print("attached", flush=True)
sys.stdin.readline()
with contextlib.suppress(AssertionError):  # past the bound, "no-relet" says so to the test
    wait_until(lambda: w._lease.relets >= 1, 60, "the lease to be taken again", interval=0.02)
print("relet" if w._lease.relets else "no-relet", flush=True)
sys.stdin.readline()
moved.wait(60)
print(*(["moved", moves[0].alias, moves[0].old_version, moves[0].new_version] if moves else ["not-moved"]), flush=True)
w.release()
