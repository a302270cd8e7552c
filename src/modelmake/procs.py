"""Child processes: the helpers that serving (:mod:`modelmake.serve`) and the distillation launcher
(:mod:`modelmake.distill.launch`) share.

* :func:`free_port`: a TCP port free now on a host;
* :func:`start_in_group`: a child in its own session (so its own process group), its output to a
  log, and by default ``PR_SET_PDEATHSIG`` so it gets SIGTERM when its parent dies, even by SIGKILL;
* :func:`stop_process_groups`: SIGTERM to each child's group, a grace period, then SIGKILL;
* :func:`start_time`: the kernel's start time of a pid, to tell a live process from a reused pid;
* :func:`locked`: an exclusive ``flock`` on a file while in the block;
* :func:`log_tail`: the last lines of a log, for error messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_in_group(
    cmd: list[str], log_path: str | Path, env: dict[str, str] | None = None, *, append: bool = True,
    with_parent: bool = True,
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, the one :func:`stop_process_groups`
    stops), stdout and stderr to ``log_path`` (appended, or truncated with ``append=False``), stdin
    closed, with ``env`` as its whole environment (None: this process's).

    ``with_parent=True`` also sets ``PR_SET_PDEATHSIG``: the child gets SIGTERM when this process
    dies, however it dies. ``with_parent=False`` starts a detached child that outlives its parent.
    """
    with open(log_path, "ab" if append else "wb") as logf:
        if with_parent:
            return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=die_with_parent)
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def stop_process_groups(procs: list[tuple[str, subprocess.Popen]], grace_s: float) -> None:
    """Stop processes started in their own session (:func:`start_in_group`), each with its whole
    process group: SIGTERM to every group, wait up to ``grace_s`` in all, then SIGKILL whatever is
    left of each group (a group may hold grandchildren, vLLM's engine core, even after its leader
    exited)."""
    for _name, p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for name, p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, p.pid)
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def start_time(pid: int) -> str | None:
    """The kernel's start time of a process (None when it is gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


@contextlib.contextmanager
def locked(path: str | Path):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while in the block."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def log_tail(path: str | Path, n: int = 15) -> str:
    """The last ``n`` lines of a log, for an error message ("(no log)" when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"
