"""The teacher service: one teacher process per group of training ranks, over torch.distributed.

Layout of one run's world (``G`` groups of ``R`` trainer ranks)::

    rank g*(R+1)          teacher of group g
    rank g*(R+1) + 1 + j  trainer j of group g      (trainer index g*R + j: its data shard)

Every process creates the same subgroups in the same order: one per teacher group (the teacher
and its R trainers) and one of all trainers (gradients). Gloo on CPU, NCCL on GPU.

Protocol, per group (all collectives inside the group, timeouts from ``init_process_group``):

1. handshake: every member all-gathers its :class:`Spec` (protocol version, batch, length, vocab,
   hidden states on/off, number of hidden states, hidden size, top-k). Everyone compares every
   row with the teacher's; on any difference *every* member raises :class:`ProtocolError` naming
   the rank and the fields, so a mismatch never deadlocks or corrupts a tensor.
2. the teacher writes ``group{g}.ready`` atomically (rendezvous, model, the agreed spec);
3. per step: trainers gather a command (1 forward, 0 stop) to the teacher, the teacher broadcasts
   its decision (1 go, 0 stop, -1 ranks disagree: everyone raises); on go, trainers gather
   ``input_ids`` and ``attention_mask`` [batch, length]; the teacher runs one batched no-grad
   forward over [R*batch, length] and scatters back each rank's logits (full, or top-k values and
   indices) and, when asked, every layer's hidden states [layers+1, batch, length, hidden].
4. stop: when every trainer sent 0 the teacher removes its readiness file and exits 0.

A dead peer breaks the group's sockets (Gloo raises at once) or hits the collective timeout; the
stage's supervisor (modelmake.distill.launch) also kills every process of the run as soon as one
exits with an error, so nothing hangs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from modelmake.errors import UserError
from modelmake.files import write_json

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
CMD_STOP, CMD_FORWARD, CMD_DISAGREE = 0, 1, -1


class ProtocolError(UserError):
    """The teacher and a trainer disagree on the protocol (shapes, flags) or the number of steps."""


@dataclass(frozen=True)
class Spec:
    """What both sides of a group must agree on before any tensor moves."""

    version: int
    batch: int
    length: int
    vocab: int
    hidden: int  # 1: return every layer's hidden states
    n_hidden: int  # num_hidden_layers + 1 (embeddings first), 0 when hidden == 0
    hidden_size: int
    topk: int  # 0: full logits

    def tensor(self, device):
        import torch

        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, t) -> "Spec":
        return cls(*[int(x) for x in t.tolist()])


@dataclass(frozen=True)
class Layout:
    groups: int
    ranks_per_group: int

    @property
    def world_size(self) -> int:
        return self.groups * (self.ranks_per_group + 1)

    def teacher_rank(self, g: int) -> int:
        return g * (self.ranks_per_group + 1)

    def members(self, g: int) -> list[int]:
        t = self.teacher_rank(g)
        return list(range(t, t + self.ranks_per_group + 1))

    def trainers(self) -> list[int]:
        return [r for g in range(self.groups) for r in self.members(g)[1:]]

    def role(self, rank: int) -> tuple[str, int, int]:
        """(teacher|trainer, group, trainer index or -1)."""
        g, i = divmod(rank, self.ranks_per_group + 1)
        return ("teacher", g, -1) if i == 0 else ("trainer", g, g * self.ranks_per_group + i - 1)


class Groups:
    """The subgroups of one run's world, created in the same order by every process."""

    def __init__(self, layout: Layout):
        import torch.distributed as dist

        self.layout = layout
        self.teacher_groups = [dist.new_group(layout.members(g)) for g in range(layout.groups)]
        self.trainers = dist.new_group(layout.trainers())


def check_specs(specs: list[Spec], group: int) -> None:
    """Compare every member's spec with the teacher's (index 0); raise on any difference."""
    want = specs[0]
    problems = []
    for i, s in enumerate(specs[1:], start=1):
        diff = [f"{f.name}: teacher {getattr(want, f.name)}, trainer {getattr(s, f.name)}"
                for f in fields(Spec) if getattr(want, f.name) != getattr(s, f.name)]
        if diff:
            problems.append(f"trainer {i} of group {group}: " + "; ".join(diff))
    if problems:
        raise ProtocolError(
            "teacher handshake rejected: " + " | ".join(problems)
            + ". Teacher and trainers must use the same distill settings (batch_size, max_len, "
              "teacher_topk, hidden states) and a student built from this teacher.")


def handshake(spec: Spec, group, device) -> list[Spec]:
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    mine = spec.tensor(device)
    rows = [torch.zeros_like(mine) for _ in range(n)]
    dist.all_gather(rows, mine, group=group)
    return [Spec.from_tensor(r.cpu()) for r in rows]


class TeacherServer:
    """The teacher side of one group: handshake, readiness file, serve until every trainer stops."""

    def __init__(self, model, spec: Spec, group, group_index: int, teacher_rank: int, device, ready: Path,
                 rendezvous: dict, out_dtype):
        self.model, self.spec, self.group, self.g = model, spec, group, group_index
        self.rank, self.device, self.ready, self.rendezvous = teacher_rank, device, Path(ready), rendezvous
        self.out_dtype = out_dtype
        self.exit_after = 0
        self.forwards = 0
        self.tokens = 0
        self.busy_s = 0.0

    def serve(self) -> dict:
        import torch
        import torch.distributed as dist

        check_specs(handshake(self.spec, self.group, self.device), self.g)
        n = dist.get_world_size(self.group)
        write_json(self.ready, {**self.rendezvous, "group": self.g, "trainers": n - 1,
                                "teacher_pid": os.getpid(), "spec": asdict(self.spec)})
        log.info("group %d formed (%d trainers); ready at %s", self.g, n - 1, self.ready)
        s, B, L = self.spec, self.spec.batch, self.spec.length
        try:
            while True:
                cmd = torch.full((1,), CMD_FORWARD, dtype=torch.int64, device=self.device)
                cmds = [torch.zeros_like(cmd) for _ in range(n)]
                dist.gather(cmd, cmds, dst=self.rank, group=self.group)
                got = {int(c.item()) for c in cmds[1:]}
                decision = CMD_FORWARD if got == {CMD_FORWARD} else CMD_STOP if got == {CMD_STOP} else CMD_DISAGREE
                dist.broadcast(torch.full((1,), decision, dtype=torch.int64, device=self.device),
                               src=self.rank, group=self.group)
                if decision == CMD_STOP:
                    break
                if decision == CMD_DISAGREE:
                    raise ProtocolError(f"group {self.g}: trainers disagree on the number of steps ({sorted(got)}); "
                                        "every rank of a group must run the same number of steps")
                ids = torch.zeros(B, L, dtype=torch.int64, device=self.device)
                mask = torch.zeros_like(ids)
                all_ids = [torch.zeros_like(ids) for _ in range(n)]
                all_mask = [torch.zeros_like(ids) for _ in range(n)]
                dist.gather(ids, all_ids, dst=self.rank, group=self.group)
                dist.gather(mask, all_mask, dst=self.rank, group=self.group)
                t0 = time.perf_counter()
                logits, hiddens = teacher_outputs(self.model, torch.cat(all_ids[1:]), torch.cat(all_mask[1:]), s,
                                                  self.out_dtype)
                self.busy_s += time.perf_counter() - t0
                self.forwards += 1
                if self.exit_after and self.forwards >= self.exit_after:  # test hook: a teacher that dies
                    log.error("exiting after %d forwards (test hook teacher_exit_after)", self.forwards)
                    os._exit(9)
                self.tokens += int(torch.cat(all_mask[1:]).sum())
                parts = [logits] if s.topk == 0 else list(logits)
                if s.hidden:
                    parts.append(hiddens)
                for t in parts:
                    chunks = list(t.split(B, dim=1 if t is hiddens else 0))
                    out = torch.empty_like(chunks[0])
                    dist.scatter(out, [torch.empty_like(out)] + [c.contiguous() for c in chunks],
                                 src=self.rank, group=self.group)
        finally:
            self.ready.unlink(missing_ok=True)
        log.info("group %d: %d forwards, %d tokens, %.1f s busy", self.g, self.forwards, self.tokens, self.busy_s)
        return {"forwards": self.forwards, "tokens": self.tokens, "busy_s": round(self.busy_s, 3)}


def teacher_outputs(model, input_ids, attention_mask, spec: Spec, out_dtype):
    """One no-grad forward: (logits, hidden states) shaped as the protocol sends them."""
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=bool(spec.hidden))
    logits = out.logits.to(out_dtype)
    if spec.topk:
        vals, idx = logits.topk(spec.topk, dim=-1)
        logits = (vals, idx)
    hiddens = torch.stack(out.hidden_states).to(out_dtype) if spec.hidden else None
    return logits, hiddens


class RemoteTeacher:
    """The trainer side: ``outputs(input_ids, mask)`` -> (logits | (topk values, indices), hiddens)."""

    def __init__(self, spec: Spec, group, group_index: int, teacher_rank: int, device, out_dtype):
        self.spec, self.group, self.g, self.rank, self.device = spec, group, group_index, teacher_rank, device
        self.out_dtype = out_dtype
        check_specs(handshake(spec, group, device), group_index)

    def _command(self, cmd: int) -> int:
        import torch
        import torch.distributed as dist

        dist.gather(torch.full((1,), cmd, dtype=torch.int64, device=self.device), None, dst=self.rank, group=self.group)
        decision = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(decision, src=self.rank, group=self.group)
        return int(decision.item())

    def outputs(self, input_ids, attention_mask):
        import torch
        import torch.distributed as dist

        s = self.spec
        if tuple(input_ids.shape) != (s.batch, s.length):
            raise ProtocolError(f"batch shape {tuple(input_ids.shape)} differs from the agreed ({s.batch}, {s.length})")
        if self._command(CMD_FORWARD) != CMD_FORWARD:
            raise ProtocolError(f"group {self.g}: the teacher refused a forward (other trainers stopped or "
                                "disagree on the number of steps)")
        dist.gather(input_ids.to(self.device, torch.int64).contiguous(), None, dst=self.rank, group=self.group)
        dist.gather(attention_mask.to(self.device, torch.int64).contiguous(), None, dst=self.rank, group=self.group)

        def recv(shape, dtype):
            t = torch.empty(shape, dtype=dtype, device=self.device)
            dist.scatter(t, None, src=self.rank, group=self.group)
            return t

        if s.topk:
            logits = (recv((s.batch, s.length, s.topk), self.out_dtype), recv((s.batch, s.length, s.topk), torch.int64))
        else:
            logits = recv((s.batch, s.length, s.vocab), self.out_dtype)
        hiddens = recv((s.n_hidden, s.batch, s.length, s.hidden_size), self.out_dtype) if s.hidden else None
        return logits, hiddens

    def close(self) -> None:
        self._command(CMD_STOP)


class LocalTeacher:
    """The same outputs computed in-process (baseline of the benchmark; DeepSpeed test; evaluation)."""

    def __init__(self, model, spec: Spec, device, out_dtype):
        self.model, self.spec, self.device, self.out_dtype = model, spec, device, out_dtype

    def outputs(self, input_ids, attention_mask):
        return teacher_outputs(self.model, input_ids.to(self.device), attention_mask.to(self.device), self.spec,
                               self.out_dtype)

    def close(self) -> None:
        pass
