# selfplay: the pipeline's config slice, results layout and input functions, used by rules/selfplay.smk
# (functions apart from rules, as snakemake --lint asks).

SP = config["selfplay"]


def sp_path(*parts):
    """selfplay/{run}/...: every self-play artifact of the configured run."""
    return results("selfplay", SP["run"], *parts)


def sp_settings(t):
    """Iteration t's train and sampling settings: the section's, updated by per_iteration[t]."""
    over = SP["per_iteration"][t] if t < len(SP["per_iteration"]) else {}
    return {"train": {**SP["train"], **over.get("train", {})},
            "sampling": {**SP["sampling"], **over.get("sampling", {})}}


def sp_recipe(t):
    """What makes iteration t's model (the SFT model, data, how training scales and every iteration's
    settings up to t): deterministic training makes it an identity of the weights, known before they exist."""
    return {"sft": model_source(SP["sft_model"]), "dataset": config["datasets"][SP["dataset"]],
            "seed": config["seed"], "scale": SP["scale"], "iterations": [sp_settings(i) for i in range(t + 1)]}


def sp_start_model(t):
    """The model iteration t generates with and starts from (and is regularised towards)."""
    return model_dir(SP["sft_model"]) if t == 0 else sp_path(f"iter{t - 1}", "model")


def sp_start_inputs(t):
    return model_inputs(SP["sft_model"]) if t == 0 else [sp_path(f"iter{t - 1}", "model")]


def sp_start_source(t):
    return model_source(SP["sft_model"]) if t == 0 else {"selfplay": sp_recipe(t - 1)}


def sp_pool(t):
    """What iteration t's generated records call their model, and the name its pool serves it under
    from iteration 1 on (iteration 0 serves the SFT model, in the pool of every job serving it)."""
    return f"selfplay-{SP['run']}-iter{t}"


def sp_split(part):
    """The dataset split behind a self-play part name (train | test)."""
    return SP["train_split"] if part == "train" else SP["test_split"]


def sp_generation_settings(w):
    """Iteration it's generation settings: the section's, with that iteration's sampling."""
    t = int(w.it)
    return generation_settings("selfplay", {**SP, "sampling": sp_settings(t)["sampling"]}, sp_start_source(t))


def sp_generated(w):
    """Every generated fraction of a split (the count is known once the fractions are written)."""
    folder = checkpoints.selfplay_fractions.get(sppart=w.sppart).output[0]
    n = json.loads((Path(folder) / "layout.json").read_text())["fractions"]
    return [sp_path(f"iter{w.it}", "generated", w.sppart, f"frac{k}.jsonl") for k in range(n)]


def sp_targets():
    """Every iteration's model and metrics, and the plot across iterations."""
    if not SP["iterations"]:
        return []
    return [sp_path(f"iter{t}", "model") for t in range(SP["iterations"])] + [
        sp_path("metrics.png"), sp_path("metrics.json")]
