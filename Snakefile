# modelmake: one Snakemake workflow that builds LLM data and models.
# The Snakefile only loads the config, includes the rules and names the default target;
# shared wiring lives in rules/common.smk, each pipeline's in its own rules/<pipeline>.smk,
# logic in src/modelmake.

from snakemake.utils import min_version

min_version("9.0")


# A config given with --configfile is the whole config (several files deep-merge in order);
# the embedded demo, config.yaml, is used only when none is given.
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


# snakemake --report: this overview, then a section per pipeline (rules/common.smk report_item).
report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/assets.smk"
include: "rules/data.smk"


# A pipeline is built if and only if its section is in the config. Every present pipeline's helpers
# (rules/functions/<pipeline>.smk: its paths) come before any of its rules: a model role may name a
# model another pipeline builds (models.<role>.built), and rules/common.smk's model_dir maps it to
# that pipeline's path. Each rules/<pipeline>.smk adds its targets to TARGETS.
for pipeline in PIPELINES:
    if pipeline in config:

        include: f"rules/functions/{pipeline}.smk"


for pipeline in PIPELINES:
    if pipeline in config:

        include: f"rules/{pipeline}.smk"


rule all:
    """Everything the config asks for: the targets of every pipeline it has a section for."""
    input:
        TARGETS,
    default_target: True
