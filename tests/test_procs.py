"""modelmake.procs: children in their own process group, dying with their parent, stopped whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from conftest import pid_alive, wait_until

from modelmake import procs


def test_a_child_gets_sigterm_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from modelmake.procs import start_in_group
        child = start_in_group(["sleep", "60"], {str(tmp_path / "child.log")!r})
        print(child.pid, flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert pid_alive(child) and os.getsid(child) == child  # a session, so a group, of its own
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        wait_until(lambda: not pid_alive(child), timeout=10, what="the orphan to get SIGTERM")
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
            parent.wait()


def test_stopping_a_group_stops_the_grandchildren_its_leader_left(tmp_path):
    mark = tmp_path / "grandchild"
    # the leader starts a grandchild in its group, reports its pid and exits at once
    leader = procs.start_in_group(["sh", "-c", f"sleep 60 & echo $! > {mark}"], tmp_path / "log",
                                  append=False)
    try:
        grandchild = int(wait_until(lambda: mark.exists() and mark.read_text().strip(), timeout=10,
                                    what="the grandchild's pid"))
        leader.wait(timeout=10)
        assert pid_alive(grandchild)
        procs.stop_process_groups([("leader", leader)], grace_s=5)
        wait_until(lambda: not pid_alive(grandchild), timeout=5, what="the grandchild to be killed")
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_start_time_tells_a_live_process_from_a_gone_one():
    assert procs.start_time(os.getpid()) == procs.start_time(os.getpid()) is not None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert procs.start_time(gone.pid) is None


def test_log_tail_is_the_last_lines_or_says_there_is_no_log(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)))
    assert procs.log_tail(log, 3) == "line 27\nline 28\nline 29"
    assert procs.log_tail(tmp_path / "missing.log") == "(no log)"
