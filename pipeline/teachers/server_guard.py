"""Run a command, and take its whole process group down when the process that started us dies.

`python server_guard.py PARENT_PID [--pass-fds 5,6] -- CMD...`, started by `ManagedServer` (or `EngineProcess`) in a
new session; `--pass-fds` hands those inherited descriptors (the engine worker's pipes) on to CMD and closes them
here, so the caller sees the pipe close when CMD dies. A `kill -9` of
`distill` runs no cleanup, and vLLM's engine process outlives its API server when that is killed, so
this guard asks Linux for SIGTERM when its parent dies (PR_SET_PDEATHSIG) and then stops the group:
SIGTERM, a grace period, SIGKILL. Standard library only: it runs under the teacher environment's Python.
"""

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
GRACE_S = 15.0


def main() -> int:
    split = sys.argv.index("--")
    parent, opts, cmd = int(sys.argv[1]), sys.argv[2:split], sys.argv[split + 1 :]
    fds = [int(fd) for fd in opts[opts.index("--pass-fds") + 1].split(",")] if "--pass-fds" in opts else []
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the caller's stop() is the only guard
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        return 1
    child = subprocess.Popen(cmd, pass_fds=fds)  # same process group as us: the group the caller stops
    for fd in fds:
        os.close(fd)

    def exited() -> bool:
        # Not child.poll(): this handler interrupts child.wait(), which holds the Popen's wait lock, so poll()
        # would report "running" for the whole grace period.
        try:
            return os.waitpid(child.pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True

    def stop_group(_signum, _frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        while not exited() and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(0, signal.SIGKILL)  # engine workers the server left behind, and this guard

    signal.signal(signal.SIGTERM, stop_group)
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
