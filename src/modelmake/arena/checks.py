"""Cross-checks of the ``arena:`` config section that JSON schema cannot make (called by modelmake.config)."""

from __future__ import annotations


def cross_checks(c: dict) -> list[str]:
    a = c["arena"]
    out = []
    for key in ("bases", "response_pairs.generators"):
        node = a
        for k in key.split("."):
            node = node[k]
        if len(set(node)) != len(node):
            out.append(f"arena.{key}: names must be distinct, got {node}")
    for b in a["bases"]:
        if b not in a["pseudo"]["weights"]:
            out.append(f"arena.pseudo.weights: no weight for base {b!r}; give every base in arena.bases a weight")
    if a["valid_fold"] >= a["folds"]:
        out.append(f"arena.valid_fold: {a['valid_fold']} is not below arena.folds={a['folds']}")
    for b in a["bases"]:
        m = c["models"].get(b, {})
        arch = c.get("assets", {}).get("models", {}).get(m.get("asset"), {})
        if arch and a["template"]["max_length"] > arch["max_len"]:
            out.append(f"arena.template.max_length: {a['template']['max_length']} exceeds the max_len "
                       f"{arch['max_len']} of assets.models.{m['asset']} (base {b})")
    return out
