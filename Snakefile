# DEO: dual-teacher distillation for multispectral Earth observation, from raw downloads to
# the results table. Run `snakemake --cores all` for the embedded default (config/config.yaml).
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


wildcard_constraints:
    shard=r"\d+",
    run=r"[A-Za-z0-9_-]+",
    model=r"[A-Za-z0-9_-]+",
    seed=r"\d+",
    variant=r"(partner|derived)-(aug|plain)",
    part=r"\d+",


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_targets(),
