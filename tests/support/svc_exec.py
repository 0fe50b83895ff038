"""Run by svcmgr.py between fork and the service's command: ``python svc_exec.py CMD ARGS...``.

Popen's pass_fds keeps fd numbers, but the protocol wants the stored fds at 3, 4, ... and
LISTEN_PID/WATCHDOG_PID naming the process that will run the command; exec keeps the pid, so this
process's pid is that one.
"""

import fcntl
import os
import sys

src = [int(f) for f in os.environ.pop("_SVCMGR_FDS").split(",") if f]
names = os.environ.pop("_SVCMGR_FDNAMES")
n = len(src)
# First above the target range, so that no dup2 onto 3+i clobbers a source not yet moved.
high = [fcntl.fcntl(f, fcntl.F_DUPFD_CLOEXEC, 3 + n) for f in src]
for f in src:
    os.close(f)
for i, f in enumerate(high):
    os.dup2(f, 3 + i, inheritable=True)
    os.close(f)
if n:
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(n), LISTEN_FDNAMES=names)
if os.environ.pop("_SVCMGR_WATCHDOG", None):
    os.environ["WATCHDOG_PID"] = str(os.getpid())
os.execvp(sys.argv[1], sys.argv[1:])
