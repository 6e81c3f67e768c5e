# DEO: dual-teacher distillation for multispectral Earth observation, from raw downloads to
# the results table. Run `snakemake --cores all` for the embedded default (config/config.yaml).
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"


rule all:
    input:
        all_targets(),
    default_target: True
