"""One process of a distillation stage: a teacher (serving its group) or a trainer rank.

The stage's supervisor (modelmake.distill.launch) writes ``job.json`` and starts every process
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK set. Trainers:

* build the student from the stage's input folder, freeze what ``trainable`` says to; take
  precision (autocast, or DeepSpeed's bf16 / fp16), DeepSpeed and gradient checkpointing from the
  stage's ``scale`` (``distill.scale``, :mod:`modelmake.launch`);
* read batches in a seeded order that is a function of the step only, so a resumed run sees the
  same batches as an uninterrupted one;
* ask the teacher (remote, over the group; or local, in-process) for logits / hidden states;
* average gradients over all trainers, step, and on trainer 0 write ``checkpoint-N`` every
  ``save_every`` steps (``trainer_state.json`` last) into the checkpoint folder, which survives a
  failed job; a rerun resumes from the newest complete one;
* at the end trainer 0 saves the model folder (training.save_model_folder), loss history and curve.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path

from modelmake import launch
from modelmake.files import read_json, write_json
from modelmake.training import (
    peak_memory_bytes, plot_loss_curves, resume_checkpoint, save_model_folder, seed_everything,
)

log = logging.getLogger(__name__)


def device_for(backend: str):
    import torch

    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def out_dtype(job: dict, device):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        job["settings"]["transfer_dtype"] if device.type == "cuda" else "float32"]


def spec_for(config, job: dict):
    from modelmake.distill.service import PROTOCOL_VERSION, Spec

    s = job["settings"]
    hidden = 1 if s["stage"] == 1 else 0
    return Spec(version=PROTOCOL_VERSION, batch=s["batch_size"], length=s["max_len"], vocab=config.vocab_size,
                hidden=hidden, n_hidden=(config.num_hidden_layers + 1) * hidden,
                hidden_size=config.hidden_size * hidden, topk=0 if s["stage"] == 1 else s["teacher_topk"])


def init_world(job: dict):
    import torch.distributed as dist

    from modelmake.distill.service import Groups, Layout

    layout = Layout(job["groups"], job["ranks_per_group"])
    if not dist.is_initialized():
        dist.init_process_group(job["backend"], timeout=timedelta(seconds=job["settings"]["collective_timeout_s"]))
    if dist.get_world_size() != (layout.world_size if job["teacher_mode"] == "service" else layout.groups * layout.ranks_per_group):
        raise RuntimeError(f"world size {dist.get_world_size()} does not fit the layout {layout}")
    if job["teacher_mode"] == "local":
        return layout, None, None
    groups = Groups(layout)
    # DeepSpeed asks for a model-parallel group: one per rank (created by every process, in order)
    singles = [dist.new_group([r]) for r in range(layout.world_size)] if job["scale"]["deepspeed"] else None
    return layout, groups, singles


def run_teacher(job: dict, layout, groups, rank: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from modelmake.distill.service import TeacherServer

    _, g, _ = layout.role(rank)
    device = device_for(job["backend"])
    dtype = out_dtype(job, device)
    model = AutoModelForCausalLM.from_pretrained(job["teacher"], dtype=dtype if device.type == "cuda" else torch.float32)
    model.to(device).eval()
    spec = spec_for(model.config, job)
    server = TeacherServer(model, spec, groups.teacher_groups[g], g, layout.teacher_rank(g), device,
                           Path(job["ready_dir"]) / f"group{g}.ready",
                           {"address": os.environ["MASTER_ADDR"], "port": int(os.environ["MASTER_PORT"]),
                            "world_size": layout.world_size, "backend": job["backend"], "model": job["teacher"],
                            "rank": rank, "members": layout.members(g)},
                           dtype)
    server.exit_after = int(job["settings"].get("teacher_exit_after", 0))
    stats = server.serve()
    write_json(Path(job["ckpt"]) / f"teacher_group{g}.stats.json", stats)


def trainable_parameters(model, which: str) -> list:
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "rwkv":
        for tm in model.time_mixes():
            for p in tm.parameters():
                p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


class Batches:
    """Global batch of step s = positions s*W*B .. (s+1)*W*B of an endless seeded epoch stream."""

    def __init__(self, tensors, batch: int, world: int, index: int, seed: int):
        import torch

        self.tensors, self.b, self.w, self.i, self.seed = tensors, batch, world, index, seed
        self.n = tensors[0].shape[0]
        self.perms: dict[int, torch.Tensor] = {}
        self.torch = torch

    def perm(self, epoch: int):
        if epoch not in self.perms:
            g = self.torch.Generator().manual_seed(self.seed * 1000 + epoch)
            self.perms[epoch] = self.torch.randperm(self.n, generator=g)
        return self.perms[epoch]

    def __call__(self, step: int):
        start = step * self.w * self.b + self.i * self.b
        idx = self.torch.stack([self.perm(p // self.n)[p % self.n] for p in range(start, start + self.b)])
        return tuple(t[idx] for t in self.tensors)


def lr_at(step: int, s: dict) -> float:
    warm = max(1, s["warmup_steps"])
    if step < warm:
        return s["lr"] * (step + 1) / warm
    progress = (step - warm) / max(1, s["steps"] - warm)
    return s["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def run_trainer(job: dict, layout, groups, singles, rank: int) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelmake.distill import hybrid, losses
    from modelmake.distill.data import load_rows
    from modelmake.distill.service import LocalTeacher, RemoteTeacher

    hybrid.register()
    s, sc = job["settings"], job["scale"]
    started = time.time()
    if job["teacher_mode"] == "service":
        _, g, index = layout.role(rank)
        trainer_group = groups.trainers
    else:
        g, index, trainer_group = rank // layout.ranks_per_group, rank, dist.group.WORLD
    n_trainers = layout.groups * layout.ranks_per_group
    device = device_for(job["backend"])
    seed_everything(s["seed"])
    student = AutoModelForCausalLM.from_pretrained(job["student"]).to(device)
    if sc["gradient_checkpointing"]:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    log.info("precision %s, gradient checkpointing %s, DeepSpeed %s", sc["precision"],
             "on" if student.is_gradient_checkpointing else "off", sc["deepspeed"] or "off")
    params = trainable_parameters(student, s["trainable"])
    spec = spec_for(student.config, job)
    if job["teacher_mode"] == "service":
        teacher = RemoteTeacher(spec, groups.teacher_groups[g], g, layout.teacher_rank(g), device,
                                out_dtype(job, device))
    else:
        tmodel = AutoModelForCausalLM.from_pretrained(job["teacher"]).to(device).eval()
        teacher = LocalTeacher(tmodel, spec, device, out_dtype(job, device))
    batches = Batches(load_rows(job["data"]), s["batch_size"], n_trainers, index, s["seed"])

    ckpt_dir = Path(job["ckpt"])
    engine = None
    # fp16 without DeepSpeed: a gradient scaler (a no-op pass-through otherwise)
    scaler = torch.amp.GradScaler(device.type, enabled=sc["precision"] == "fp16" and not sc["deepspeed"])
    if sc["deepspeed"]:
        import deepspeed

        ds_cfg = read_json(sc["deepspeed"])
        ds_cfg.update({"train_micro_batch_size_per_gpu": s["batch_size"], "gradient_accumulation_steps": 1,
                       "train_batch_size": s["batch_size"] * n_trainers, "gradient_clipping": s["grad_clip"]})
        for name in ("bf16", "fp16"):
            ds_cfg[name] = {**ds_cfg.get(name, {}), "enabled": sc["precision"] == name}
        ds_cfg.setdefault("optimizer", {"type": "AdamW", "params": {"lr": s["lr"], "weight_decay": s["weight_decay"]}})
        mpu = TrainerMPU(trainer_group, singles[rank]) if singles else None
        engine, opt, _, _ = deepspeed.initialize(model=student, model_parameters=params, config=ds_cfg, mpu=mpu)
        model = engine
    else:
        opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"])
        model = student

    step, history = 0, []
    last = resume_checkpoint(ckpt_dir)
    if last:
        state = read_json(Path(last) / "trainer_state.json")
        step, history = state["global_step"], state["log_history"]
        if engine is not None:
            engine.load_checkpoint(str(ckpt_dir), tag=Path(last).name)
        else:
            saved = torch.load(Path(last) / "state.pt", map_location=device, weights_only=False)
            student.load_state_dict(saved["trainable"], strict=False)
            opt.load_state_dict(saved["optimizer"])
            if saved.get("scaler"):
                scaler.load_state_dict(saved["scaler"])
        log.info("resumed at step %d from %s", step, last)

    student.train()
    t_teacher = t_total = 0.0
    while step < s["steps"]:
        t0 = time.perf_counter()
        ids, mask, labels = (t.to(device) for t in batches(step))
        t1 = time.perf_counter()
        t_logits, t_hiddens = teacher.outputs(ids, mask)
        t_teacher += time.perf_counter() - t1
        for group_ in opt.param_groups:
            group_["lr"] = lr_at(step, s)
        with launch.autocast(sc, device) if engine is None else contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=s["stage"] == 1)
        row = {"step": step + 1, "lr": lr_at(step, s)}
        if s["stage"] == 1:
            loss = losses.hidden_mse(out.hidden_states, t_hiddens, mask)
            row["mse_loss"] = float(loss)
        else:
            kl = losses.kl_to_teacher(out.logits, t_logits, labels, s["temperature"])
            ce = losses.ce(out.logits, labels)
            loss = s["kl_weight"] * kl + s["ce_weight"] * ce
            row.update({"kl_loss": float(kl), "ce_loss": float(ce)})
        row["loss"] = float(loss)
        if engine is not None:
            engine.backward(loss)
            engine.step()
        else:
            scaler.scale(loss).backward()
            if n_trainers > 1:
                for p in params:
                    dist.all_reduce(p.grad, group=trainer_group)
                    p.grad /= n_trainers
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, s["grad_clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        step += 1
        t_total += time.perf_counter() - t0
        history.append(row)
        if step % s["log_every"] == 0 or step == s["steps"]:
            log.info("step %d %s", step, {k: round(v, 4) for k, v in row.items() if k != "step"})
        if step % s["save_every"] == 0 and step < s["steps"]:
            save_checkpoint(ckpt_dir, step, history, student, opt, engine, index == 0, scaler)
            if s.get("fail_at_step") == step and index == 0:  # test hook: a kill right after a checkpoint
                os._exit(17)
    teacher.close()
    model_to_save = consolidated(engine, student, job["student"]) if engine is not None else student  # collective
    # transformers saves only on global rank 0 while a process group exists (rank 0 may be a teacher)
    dist.destroy_process_group()
    if index == 0:
        tok = AutoTokenizer.from_pretrained(job["student"])
        save_model_folder(job["out"], model_to_save, tok, config={**s, "scale": sc},
                          inputs=[job["student"], *job["data"]],
                          counts={"steps": step, "trainers": n_trainers, "groups": layout.groups},
                          started=started,
                          extra={"log_history.json": history,
                                 "timing.json": {"teacher_s": round(t_teacher, 3), "step_s": round(t_total, 3),
                                                 "peak_memory_bytes": peak_memory_bytes(device)}})
        plot_loss_curves(history, job["plot"], title=f"distill stage {s['stage']}")
        write_json(job["history"], history)
        log.info("saved %s", job["out"])


def save_checkpoint(ckpt_dir: Path, step: int, history, student, opt, engine, primary: bool, scaler=None) -> None:
    import torch

    name = f"checkpoint-{step}"
    folder = ckpt_dir / name
    if engine is not None:
        engine.save_checkpoint(str(ckpt_dir), tag=name)  # collective
    elif primary:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        trainable = {k: v for k, v in student.state_dict().items()
                     if dict(student.named_parameters()).get(k) is not None
                     and dict(student.named_parameters())[k].requires_grad}
        torch.save({"trainable": trainable, "optimizer": opt.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None},
                   folder / "state.pt")
    if primary:
        write_json(folder / "trainer_state.json", {"global_step": step, "log_history": history})  # last
        for old in ckpt_dir.glob("checkpoint-*"):
            if old.name != name and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def consolidated(engine, student, student_dir: str):
    """A plain copy of the student with the (ZeRO-3 partitioned) weights gathered."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        state = {k: v.detach().clone().cpu() for k, v in engine.module.state_dict().items()}
    plain = AutoModelForCausalLM.from_pretrained(student_dir)
    plain.load_state_dict(state, strict=False)
    return plain


class TrainerMPU:
    """What DeepSpeed asks an ``mpu`` for: data parallel = all trainers, no model parallelism."""

    def __init__(self, trainers, single):
        self.trainers, self.single = trainers, single

    def get_data_parallel_group(self):
        return self.trainers

    def get_data_parallel_world_size(self):
        import torch.distributed as dist
        return dist.get_world_size(self.trainers)

    def get_data_parallel_rank(self):
        import torch.distributed as dist
        return dist.get_rank(self.trainers)

    def get_model_parallel_group(self):
        return self.single

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


def main(job_path: str) -> None:
    import torch.distributed as dist

    job = read_json(job_path)
    torch_threads(job)
    layout, groups, singles = init_world(job)
    rank = dist.get_rank()
    try:
        if job["teacher_mode"] == "service" and layout.role(rank)[0] == "teacher":
            run_teacher(job, layout, groups, rank)
        else:
            run_trainer(job, layout, groups, singles, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def torch_threads(job: dict) -> None:
    import torch

    torch.set_num_threads(max(1, int(job["threads_per_process"])))


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1])
    print(json.dumps({"done": True}))
