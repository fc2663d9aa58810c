# dpsnake: DP-GEN-style concurrent learning of Deep Potential models.
#   snakemake --profile profiles/local            (workstation)
#   snakemake --profile profiles/slurm            (cluster)
# Config reference: docs/workflow.md. Results: results/ (reports in results/reports/index.html).

from snakemake.utils import min_version, validate

min_version("9.0")


report: "workflow/report/workflow.rst"


# `--configfile FILE` replaces the embedded demo config instead of being merged into it
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


# common.smk checks the config first (schema + files + type_map): one line naming what is wrong
include: "workflow/rules/common.smk"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/init.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/explore.smk"
include: "workflow/rules/select.smk"
include: "workflow/rules/label.smk"
include: "workflow/rules/collect.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        "results/reports/index.html",
        "results/models/final",
