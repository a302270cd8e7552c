"""Child processes: the helpers that serving (:mod:`modelmake.serve`) and the distillation launcher
(:mod:`modelmake.distill.launch`) share.

* :func:`free_port`: a TCP port free now on a host (another process may take it before it is used:
  :func:`port_taken` tells that failure from a log, so a caller can retry on a new port);
* :func:`loopback_env`: an environment in which no proxy applies to loopback addresses;
* :func:`start_in_group`: a child in its own session (so its own process group), its output to a
  log, and by default ``PR_SET_PDEATHSIG`` so it gets SIGTERM when its parent dies, even by SIGKILL;
* :func:`stop_process_groups`: SIGTERM to each child's group, a grace period, then SIGKILL;
* :func:`start_time`: the kernel's start time of a pid, to tell a live process from a reused pid;
* :func:`locked`: an exclusive ``flock`` on a file while in the block (waiting at most a timeout);
* :func:`log_tail`: the last lines of a log, for error messages.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from modelmake.errors import ServiceError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# how each of our servers says that its port was taken (Python's OSError, Go's net.Listen)
PORT_TAKEN = re.compile(r"\[Errno 98\]|address already in use", re.I)
KILL_WAIT_S = 30.0  # how long a SIGKILLed process may take to be reaped (D state, a slow NFS)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now; it is released at once, so another process may take it before the caller's
    server binds it: start the server, and on :func:`port_taken` start it again on a new port."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(log_text: str) -> bool:
    """Whether a server's log says it could not bind its port (taken since :func:`free_port`)."""
    return bool(PORT_TAKEN.search(log_text))


def loopback_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the loopback addresses in ``no_proxy`` and ``NO_PROXY``: a proxy setting of a
    login node (``http_proxy``, ``ALL_PROXY``, ...) still reaches the hub, never the pool's traffic."""
    env = dict(env)
    for key in ("no_proxy", "NO_PROXY"):
        hosts = [h.strip() for h in env.get(key, "").split(",") if h.strip()]
        env[key] = ",".join(hosts + [h for h in LOOPBACK if h not in hosts])
    return env


def die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_in_group(
    cmd: list[str], log_path: str | Path, env: dict[str, str] | None = None, *, append: bool = True,
    with_parent: bool = True, pass_fds: tuple[int, ...] = (),
) -> subprocess.Popen:
    """Start ``cmd`` in a new session (its own process group, the one :func:`stop_process_groups`
    stops), stdout and stderr to ``log_path`` (appended, or truncated with ``append=False``), stdin
    closed, with ``env`` as its whole environment (None: this process's) and ``pass_fds`` open in it.

    ``with_parent=True`` also sets ``PR_SET_PDEATHSIG``: the child gets SIGTERM when this process
    dies, however it dies. ``with_parent=False`` starts a detached child that outlives its parent.
    """
    with open(log_path, "ab" if append else "wb") as logf:
        if with_parent:
            return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, preexec_fn=die_with_parent, pass_fds=pass_fds)
        return subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, pass_fds=pass_fds)


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
        try:
            p.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:  # stuck in the kernel (D state): reaped by init later
            log.error("%s (pid %d) survived SIGKILL for %.0f s; leaving it", name, p.pid, KILL_WAIT_S)


def start_time(pid: int) -> str | None:
    """The kernel's start time of a process (None when it is gone or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def locked(path: str | Path, timeout_s: float = LOCK_TIMEOUT_S, poll_s: float = 0.05):
    """Hold an exclusive ``flock`` on ``path`` (created if missing) while in the block; raise
    :class:`ServiceError` when another process holds it for more than ``timeout_s``.

    A flock belongs to an open file, not to a process: a second ``locked`` of the same path in the
    same process waits for the first like any other holder."""
    deadline = time.monotonic() + timeout_s
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{path} stayed locked by another process for {timeout_s:.0f} s (`fuser {path}` "
                        f"names it); stop that process if it hangs, then run again") from None
                time.sleep(poll_s)
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
