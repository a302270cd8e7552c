# modelmake: one Snakemake workflow that builds LLM data and models.
# The Snakefile only validates the config, includes the rules and names the default targets;
# paths live in rules/common.smk, logic in src/modelmake.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "rules/common.smk"
include: "rules/assets.smk"
include: "rules/data.smk"
include: "rules/pseudo_labels.smk"
include: "rules/router.smk"
include: "rules/selfplay.smk"


# Pipelines whose section is left out of the config are not built (nor planned).
if config.get("arena"):

    include: "rules/arena.smk"


if config.get("distill"):

    include: "rules/distill.smk"


rule all:
    """Everything the config asks for."""
    input:
        pseudo_label_targets(),
        arena_targets(),
        distill_targets(),
        router_targets(),
        sp_targets(),
    default_target: True
