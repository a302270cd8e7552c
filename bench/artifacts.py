"""The small artifacts the benchmarks build for themselves in a temporary folder (their --smoke modes,
and the serving benchmark's tokenizer): made with the library's own functions from resources/demo,
never taken from the results of an earlier demo run.

Layout under ``root`` (the workflow's, so ``build_chat`` names its sources as the workflow does)::

    data/<dataset>/reformatted/train.parquet   reformatted demo chat corpora
    assets/tokenizer                            the demo tokenizer (BPE, chat template)
    assets/models/<name>                        a tiny Llama fitted for a few steps
    router/, arena/, selfplay/, distill/        each pipeline's small training inputs
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

CORPORA = ("chat_en", "chat_zh")


def demo_config() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def corpora(root: Path) -> list[Path]:
    """The demo chat corpora, reformatted (as rules/data.smk does): one parquet per dataset."""
    from modelmake.reformat import reformat_files

    out = []
    for name in CORPORA:
        path = root / "data" / name / "reformatted" / "train.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            reformat_files([REPO / f"resources/demo/{name}.jsonl"], path)
        out.append(path)
    return out


def tokenizer(root: Path) -> Path:
    """The demo's tokenizer (assets.tokenizer of config.yaml) trained on the demo corpora."""
    from modelmake.assets import build_tokenizer

    out = root / "assets" / "tokenizer"
    if not out.exists():
        build_tokenizer(corpora(root), out, vocab_size=demo_config()["assets"]["tokenizer"]["vocab_size"])
    return out


def tiny_llama(root: Path, name: str = "tiny-llama", asset: str | None = None, **overrides) -> Path:
    """The demo asset ``asset`` (default ``name``; assets.models of config.yaml) with ``overrides``
    (e.g. steps=2), in ``assets/models/<name>``."""
    from modelmake.assets import build_tiny_llama

    out = root / "assets" / "models" / name
    if not out.exists():
        arch = {**demo_config()["assets"]["models"][asset or name], **overrides}
        build_tiny_llama(tokenizer(root), corpora(root), out, seed=0, **arch)
    return out


def router_data(root: Path, n_sample: int) -> dict[str, Path]:
    """Router train / calib / test parquet from the demo's scored prompts (router.data of config.yaml)."""
    from modelmake.router.data import write_splits

    router = demo_config()["router"]
    out = {name: root / "router" / f"{name}.parquet" for name in ("train", "calib", "test")}
    if not out["train"].exists():
        out["train"].parent.mkdir(parents=True, exist_ok=True)
        write_splits([REPO / p for p in router["data"]], out, root / "router" / "stats.json",
                     n_sample=n_sample, calib=router["split"]["calib"], test=router["split"]["test"], seed=0,
                     config={})
    return out


def distill_data(root: Path, teacher: Path, max_len: int, max_rows: int) -> list[Path]:
    """Distillation train parquet of the demo chat corpora, tokenised for ``teacher``."""
    from modelmake.distill.data import build_chat

    train, held = root / "distill" / "chat_train.parquet", root / "distill" / "chat_eval.parquet"
    if not train.exists():
        train.parent.mkdir(parents=True, exist_ok=True)
        build_chat([str(p) for p in corpora(root)], str(teacher), str(train), str(held), max_len=max_len,
                   eval_rows=2, seed=0, max_rows=max_rows)
    return [train]


def distill_student(root: Path, teacher: Path, rwkv_layers: list[int], use_fla: bool = False) -> Path:
    """The hybrid student initialised from ``teacher`` (what ``modelmake distill-init`` writes);
    ``use_fla``: its time-mix layers take flash-linear-attention's kernels on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modelmake.distill.hybrid import from_teacher
    from modelmake.training import save_model_folder, seed_everything

    out = root / "distill" / "student"
    if not out.exists():
        seed_everything(0)
        student = from_teacher(AutoModelForCausalLM.from_pretrained(teacher), rwkv_layers, use_fla=use_fla)
        save_model_folder(out, student, AutoTokenizer.from_pretrained(teacher), inputs=[teacher],
                          config={"rwkv_layers": rwkv_layers, "use_fla": use_fla, "seed": 0})
    return out


def arena_labelled(root: Path) -> Path:
    """The demo's labelled arena pairs with their folds (what ``modelmake arena-data`` writes)."""
    from modelmake.arena.data import prepare

    out = root / "arena" / "labelled.parquet"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        prepare([str(REPO / "resources/demo/arena/labelled.jsonl")], out, labelled=True, folds=5, config={})
    return out


def kto_data(root: Path, n_ids: int) -> Path:
    """Self-play's KTO parquet from the demo chat corpora: for each of ``n_ids`` conversations its first
    user turn as the prompt, its own answer (label true) and the next conversation's answer (label
    false, a stand-in for a generated one), the two next to each other as ``selfplay.data.to_kto`` keeps
    them."""
    import pandas as pd

    out = root / "selfplay" / "kto.parquet"
    if not out.exists():
        convs = [list(m) for p in corpora(root) for m in pd.read_parquet(p, columns=["messages"])["messages"]]
        turns = [(next(m for m in c if m["role"] == "user"), next(m for m in c if m["role"] == "assistant"))
                 for c in convs if {m["role"] for m in c} >= {"user", "assistant"}]
        rows = []
        for i in range(min(n_ids, len(turns) - 1)):
            prompt = [{"role": "user", "content": turns[i][0]["content"]}]
            for label, answer in ((True, turns[i][1]), (False, turns[i + 1][1])):
                rows.append({"id": str(i), "prompt": prompt, "label": label,
                             "completion": [{"role": "assistant", "content": answer["content"]}],
                             "source": "real" if label else "generated"})
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(rows).to_parquet(out)
    return out
