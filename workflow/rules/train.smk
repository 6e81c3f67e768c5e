rule tiny_teacher:
    output:
        TINY_TEACHER,
    log:
        "logs/train/tiny_teacher.log",
    benchmark:
        "results/benchmarks/tiny_teacher.tsv"
    conda:
        ENV
    params:
        teacher=teacher_params(),
    shell:
        "deo tiny-teacher --teacher {params.teacher:q} --out {output} 2> {log}"


rule distill:
    input:
        unpack(distill_inputs),
    output:
        checkpoint="results/train/{run}/checkpoint.pt",
        metrics=report(
            "results/train/{run}/metrics.csv",
            caption="../report/metrics.rst",
            category="Training",
            subcategory="{run}",
        ),
    log:
        "logs/train/distill_{run}.log",
    benchmark:
        "results/benchmarks/distill_{run}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        gpu=0,  # GPUs of the whole job; one rank per GPU, one process on CPU
        nodes=1,  # > 1: one torchrun per node, via srun (see the Slurm profile)
        runtime=60,
    params:
        train=lambda wildcards: train_params(wildcards.run),
        teacher=teacher_params(),
        work=lambda wildcards: train_work_dir(wildcards.run),
        cache=teacher_cache_arg,
    shell:
        "deo train --train {params.train:q} --teacher {params.teacher:q}"
        " --store {input.store} --table {input.table} --out {params.work} {params.cache}"
        " --gpus {resources.gpu} --nodes {resources.nodes} --cpus-per-node {threads}"
        " --final-checkpoint {output.checkpoint}"
        " --final-metrics {output.metrics} 2> {log}"


rule export:
    input:
        checkpoint="results/train/{run}/checkpoint.pt",
        stats="results/data/stats.json",
    output:
        directory("results/train/{run}/export"),
    log:
        "logs/train/export_{run}.log",
    benchmark:
        "results/benchmarks/export_{run}.tsv"
    conda:
        ENV
    shell:
        "deo export --checkpoint {input.checkpoint} --stats {input.stats} --out {output} 2> {log}"
