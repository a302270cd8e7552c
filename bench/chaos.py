"""Chaos run: a pseudo-label run on the demo, hit at seeded moments, rerun until done.

One small pseudo-label workflow (the demo's tiny teacher, fitted for a few steps, the first --lines
conversations of chat_en and chat_zh, 2 shards each, 2 vLLM servers behind Traefik) is run with
the real ``snakemake``. While it generates, four events happen, each once, in a seeded order at
seeded moments: after N records are in the journals (all shards together), the event fires as
soon as its target exists:

  kill_generate    SIGKILL one generation job (its ``python -m modelmake generate`` process);
  kill_server      SIGKILL one vLLM server of the pool (its process group);
  kill_supervisor  SIGKILL the pool's supervisor (the process only; its children are on their own);
  fill_disk        fill ``results/``, a tmpfs of its own (``mount -t tmpfs``, so root), to the last
                   byte: writes fail with ENOSPC until the run ends and the filler is removed (an
                   operator freeing space before the rerun).

After each run that fails, the workflow is run again as it stands (no cleaning), at most
--max-reruns times. Then the figures:

  lost        input ids missing from labels.parquet (failed records are left out of it);
  duplicated  ids appearing twice in one journal (checked at the end of every run) or in one
              output (shard outputs, labels.parquet);
  orphans     processes still alive once the last run has ended and its pool's idle shutdown
              (serve.idle_timeout_s plus the stop grace) is over: processes of any run's session,
              of a pool process's session (servers, proxy, supervisor, vLLM's engine cores), or
              naming the run's folder on their command line; they are killed by PID;
  reruns      runs after the first one.

The first three must be 0 (the exit status is 1 otherwise, or when a run is still failing after
--max-reruns reruns). ``pseudo_labels.max_failure_share`` is 0 here: the default tolerates 5% of a
shard's records failing (a pool killed under the last records of a shard), which labels.parquet
leaves out by design, and a chaos run asks for every record.

Without root (no ``mount``), fill_disk is left out and the output says why.

Usage: python bench/chaos.py [--seed 0] [--lines 40] [--max-reruns 6] [--workdir DIR] [--keep] [--smoke]
--smoke: 16 conversations per dataset, a 5-step teacher fit, 8 tokens per answer (the slow test).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
EVENTS = ("kill_generate", "kill_server", "kill_supervisor", "fill_disk")
DATASETS = ("chat_en", "chat_zh")
TMPFS_SIZE = "64m"
IDLE_S = 3.0  # serve.idle_timeout_s of the chaos config
POLL_S = 0.1


# ------------------------------------------------------------------------------------ processes
def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def alive(pid: int) -> bool:
    from modelmake.procs import start_time

    return start_time(pid) is not None  # None: gone or a zombie


def all_pids() -> list[int]:
    return [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]


def ancestors() -> set[int]:
    """This process and its parents (the test that runs it names the folder, too)."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return out


def kill(pid: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------ the workflow
def make_workdir(wd: Path, lines: int, steps: int, max_tokens: int) -> dict[str, list[str]]:
    """Write the chaos config and the raw inputs; return the input ids per dataset."""
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    cfg = {k: copy.deepcopy(demo[k]) for k in ("seed", "assets", "reformat", "serve", "pseudo_labels")}
    cfg["results"] = str(wd / "results")
    cfg["models"] = {"teacher": demo["models"]["teacher"]}
    cfg["assets"]["models"] = {"tiny-llama": {**demo["assets"]["models"]["tiny-llama"], "steps": steps}}
    cfg["serve"].update(idle_timeout_s=IDLE_S, ready_timeout_s=300)
    cfg["pseudo_labels"]["sampling"]["max_tokens"] = max_tokens
    cfg["pseudo_labels"].update(concurrency=4, max_failure_share=0.0)
    cfg["datasets"], ids = {}, {}
    for name in DATASETS:
        demo_file = REPO / f"resources/demo/{name}.jsonl"
        raw = demo_file.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
        dst = wd / "raw" / f"{name}.jsonl"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("".join(raw), encoding="utf-8")
        cfg["datasets"][name] = {"splits": {"train": [str(dst)]}}
        ids[name] = [json.loads(line)["id"] for line in raw]
    (wd / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return ids


def snakemake_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    for v in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(v, None)
    return env


def start_run(wd: Path, n: int) -> subprocess.Popen:
    cmd = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "--directory", str(wd), "--configfile",
           str(wd / "config.yaml"), "--cores", "2"]
    with open(wd / f"run{n}.out", "w") as log:
        return subprocess.Popen(cmd, cwd=wd, env=snakemake_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


# ------------------------------------------------------------------------------------ what is there
def results(wd: Path) -> Path:
    return wd / "results"


def journals(wd: Path) -> list[Path]:
    return sorted(results(wd).glob("pseudo_labels/*/teacher/part*/.journal/*.jsonl"))


def journal_ids(path: Path) -> list[str]:
    """Ids of the complete, successful lines of a journal (a torn last line is no record)."""
    out = []
    try:
        data = path.read_bytes()
    except OSError:
        return out
    for raw in data.split(b"\n")[:-1]:
        try:
            rec = json.loads(raw)
        except ValueError:
            continue
        if isinstance(rec, dict) and "error" not in rec:
            out.append(rec.get("id"))
    return out


def journalled(wd: Path) -> int:
    return sum(len(journal_ids(p)) for p in journals(wd))


def pool_states(wd: Path) -> list[dict]:
    out = []
    for p in results(wd).glob("serve/*/part*/*/state.json"):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(p.read_text()))
    return out


def ready_servers(wd: Path) -> list[dict]:
    out = []
    for p in sorted(results(wd).glob("serve/*/part*/*/server*.ready")):
        with contextlib.suppress(OSError, ValueError):
            s = json.loads(p.read_text())
            if alive(s["pid"]):
                out.append(s)
    return out


def generate_jobs(session: int) -> list[int]:
    """The ``python -m modelmake generate`` processes of a run (not their shell wrappers)."""
    found = []
    for pid in all_pids():
        argv = cmdline(pid)
        with contextlib.suppress(OSError):
            if os.getsid(pid) == session and argv[1:4] == ["-m", "modelmake", "generate"] and alive(pid):
                found.append(pid)
    return sorted(found)


def duplicates(wd: Path) -> set[tuple[str, str]]:
    """(file, id) of every id that appears twice in one journal or one output."""
    import pandas as pd

    dup = set()

    def check(name: str, ids: list[str]) -> None:
        seen = set()
        for i in ids:
            if i in seen:
                dup.add((name, i))
            seen.add(i)

    for p in journals(wd):
        check(str(p), journal_ids(p))
    for p in results(wd).glob("pseudo_labels/*/teacher/part*/shard*.jsonl"):
        check(str(p), [json.loads(line)["id"] for line in p.read_text(encoding="utf-8").splitlines()])
    for p in results(wd).glob("pseudo_labels/*/teacher/labels.parquet"):
        check(str(p), list(pd.read_parquet(p, columns=["id"])["id"]))
    return dup


def lost(wd: Path, inputs: dict[str, list[str]]) -> list[str]:
    import pandas as pd

    missing = []
    for name, ids in inputs.items():
        p = results(wd) / f"pseudo_labels/{name}/teacher/labels.parquet"
        have = set(pd.read_parquet(p, columns=["id"])["id"]) if p.exists() else set()
        missing += [i for i in ids if i not in have]
    return missing


# ------------------------------------------------------------------------------------ the disk
def mount_tmpfs(folder: Path) -> str | None:
    """Mount a small tmpfs on ``folder``; None when it worked, else why not."""
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755", "tmpfs", str(folder)],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else (p.stderr.strip() or f"mount exited with {p.returncode}")


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # busy: detach it all the same


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; return the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 1 << 12, 1):
            block = b"\0" * chunk
            while True:
                try:
                    written += f.write(block)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
    return written


# ------------------------------------------------------------------------------------ the chaos
class Chaos:
    def __init__(self, wd: Path, inputs: dict[str, list[str]], seed: int, disk: bool):
        self.wd, self.inputs, self.rng = wd, inputs, random.Random(seed)
        total = sum(len(v) for v in inputs.values())
        events = [e for e in EVENTS if disk or e != "fill_disk"]
        self.rng.shuffle(events)
        # moments: after N journalled records, N distinct in [1, three quarters of all records]
        moments = sorted(self.rng.sample(range(1, max(len(events) + 1, 3 * total // 4)), len(events)))
        self.pending = list(zip(moments, events))
        self.fired: list[dict] = []
        self.filler: Path | None = None
        self.sessions: set[int] = set()  # every run's and every pool process's session
        self.dups: set[tuple[str, str]] = set()

    def track_pool(self) -> None:
        for st in pool_states(self.wd):
            for pid in [st.get("supervisor_pid"), *(p["pid"] for p in st.get("procs", []))]:
                if pid:
                    with contextlib.suppress(OSError):
                        self.sessions.add(os.getsid(pid))
        for logf in results(self.wd).glob("logs/serve/**/supervisor.log"):
            with contextlib.suppress(OSError):
                self.sessions.update(int(p) for p in re.findall(r"\(pid (\d+)\)", logf.read_text()))

    def fire(self, event: str, session: int) -> str | None:
        """Fire ``event`` if its target exists now; what was hit, or None."""
        if event == "kill_generate":
            jobs = generate_jobs(session)
            if not jobs:
                return None
            pid = self.rng.choice(jobs)
            what = " ".join(cmdline(pid)[4:5])
            kill(pid)
            return f"generate pid {pid} ({Path(what).name})"
        if event == "kill_server":
            servers = ready_servers(self.wd)
            if not servers:
                return None
            s = self.rng.choice(servers)
            kill(s["pid"], group=True)
            return f"server {s['index']} pid {s['pid']}"
        if event == "kill_supervisor":
            from modelmake.serve import supervisor_alive

            sups = [st for st in pool_states(self.wd) if supervisor_alive(st)]
            if not sups:
                return None
            kill(sups[0]["supervisor_pid"])
            return f"supervisor pid {sups[0]['supervisor_pid']} ({sups[0]['status']})"
        if event == "fill_disk":
            self.filler = results(self.wd) / ".chaos-filler"
            return f"results/ full ({fill(self.filler)} bytes written)"
        raise ValueError(event)

    def run(self, n: int, timeout_s: float) -> int:
        proc = start_run(self.wd, n)
        self.sessions.add(proc.pid)
        deadline = time.monotonic() + timeout_s
        while proc.poll() is None:
            self.track_pool()
            if self.pending and journalled(self.wd) >= self.pending[0][0]:
                at, event = self.pending[0]
                hit = self.fire(event, proc.pid)
                if hit:
                    self.pending.pop(0)
                    self.fired.append({"event": event, "run": n, "after": at, "records": journalled(self.wd),
                                       "hit": hit})
                    print(f"run {n}: {event} after {at} records: {hit}", flush=True)
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
                break
            time.sleep(POLL_S)
        rc = proc.wait()
        self.track_pool()
        if self.filler is not None:  # the operator frees the space before the rerun
            self.filler.unlink(missing_ok=True)
            self.filler = None
        self.dups |= {d for d in duplicates(self.wd) if "/.journal/" in d[0]}
        return rc

    def leftovers(self) -> list[int]:
        mine = ancestors()
        out = []
        for pid in all_pids():
            if pid in mine or not alive(pid):
                continue
            try:
                sid = os.getsid(pid)
            except OSError:
                continue
            if sid in self.sessions or str(self.wd) in " ".join(cmdline(pid)):
                out.append(pid)
        return out


def wait_until(predicate, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    return predicate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lines", type=int, default=40, help="conversations per dataset")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the tiny teacher")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-reruns", type=int, default=6)
    ap.add_argument("--run-timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--workdir", type=Path, help="default: a new folder in the temporary folder")
    ap.add_argument("--keep", action="store_true", help="leave the workdir (and its tmpfs) in place")
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.lines, a.steps, a.max_tokens, a.max_reruns, a.run_timeout = 16, 5, 8, 6, 300
    from modelmake.serve import STOP_GRACE_S

    wd = (a.workdir or Path(tempfile.mkdtemp(prefix="chaos"))).resolve()
    wd.mkdir(parents=True, exist_ok=True)
    inputs = make_workdir(wd, a.lines, a.steps, a.max_tokens)
    why_no_disk = mount_tmpfs(results(wd))
    if why_no_disk:
        print(f"fill_disk left out: cannot mount a tmpfs on {results(wd)} ({why_no_disk})", flush=True)
    chaos = Chaos(wd, inputs, a.seed, disk=why_no_disk is None)
    print(f"chaos run in {wd}, seed {a.seed}: {sum(map(len, inputs.values()))} records; events "
          + ", ".join(f"{e} after {n}" for n, e in chaos.pending), flush=True)
    started = time.monotonic()
    runs, done, orphans = 0, False, []
    try:
        for n in range(1 + a.max_reruns):
            runs += 1
            t = time.monotonic()
            rc = chaos.run(n, a.run_timeout)
            print(f"run {n}: exit {rc} after {time.monotonic() - t:.0f} s, "
                  f"{journalled(wd)} records journalled", flush=True)
            if rc == 0:
                done = True
                break
        # the last pool stops idle_timeout_s after its last consumer, SIGKILL after the grace period
        wait_until(lambda: not chaos.leftovers(), IDLE_S + STOP_GRACE_S + 30)
        orphans = chaos.leftovers()
        for pid in orphans:
            print(f"orphan: pid {pid}: {' '.join(cmdline(pid))[:200]}", flush=True)
            kill(pid)
        missing = lost(wd, inputs)
        dups = chaos.dups | duplicates(wd)
    finally:
        for pid in chaos.leftovers():
            kill(pid)
        if not a.keep and why_no_disk is None:
            unmount(results(wd))
    for f, i in sorted(dups)[:10]:
        print(f"duplicated: {i} in {f}")
    if missing:
        print(f"lost: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
    unfired = [e for _, e in chaos.pending]
    figures = {"seed": a.seed, "records": sum(map(len, inputs.values())), "lost": len(missing),
               "duplicated": len(dups), "orphans": len(orphans), "reruns": runs - 1, "done": done,
               "events_fired": [f["event"] for f in chaos.fired], "events_not_fired": unfired,
               "disk_full": why_no_disk is None, "seconds": round(time.monotonic() - started)}
    print(f"records lost: {len(missing)}\nrecords duplicated: {len(dups)}\norphan processes: {len(orphans)}\n"
          f"reruns needed: {runs - 1}{'' if done else f' (still failing after {a.max_reruns})'}")
    print("figures: " + json.dumps(figures))
    if not a.keep:
        subprocess.run(["rm", "-rf", str(wd)], check=False)
    else:
        tmpfs = "" if why_no_disk else f" (results/ is a tmpfs: umount {results(wd)} when done)"
        print(f"kept {wd}{tmpfs}", flush=True)
    return 0 if done and not (missing or dups or orphans or unfired) else 1


if __name__ == "__main__":
    sys.exit(main())
