rule plot_training:
    input:
        expand("results/train/{run}/metrics.csv", run=RUNS),
    output:
        report(
            "results/report/training.png",
            caption="../report/training.rst",
            category="Training",
        ),
    log:
        "logs/report/plot_training.log",
    conda:
        ENV
    params:
        runs=lambda wildcards, input: [f"{r}={m}" for r, m in zip(RUNS, input)],
    shell:
        "deo plot training {params.runs} --out {output} 2> {log}"


rule plot_data:
    input:
        "results/data/counts.json",
    output:
        report(
            "results/report/data_counts.png",
            caption="../report/data_counts.rst",
            category="Data",
        ),
    log:
        "logs/report/plot_data.log",
    conda:
        ENV
    shell:
        "deo plot data {input} --out {output} 2> {log}"


rule plot_coreg:
    input:
        "results/data/pretrain.parquet",
    output:
        report(
            "results/report/coreg.png",
            caption="../report/coreg.rst",
            category="Data",
        ),
    log:
        "logs/report/plot_coreg.log",
    conda:
        ENV
    params:
        min_score=DATA["harmonise"]["coreg_min_score"],
    shell:
        "deo plot coreg {input} --min-score {params.min_score} --out {output} 2> {log}"


rule plot_features:
    input:
        unpack(feature_inputs),
    output:
        report(
            "results/report/features_{run}.png",
            caption="../report/features.rst",
            category="Training",
            subcategory="{run}",
        ),
    log:
        "logs/report/plot_features_{run}.log",
    conda:
        ENV
    params:
        teacher=teacher_params(),
    shell:
        "deo plot-features --teacher {params.teacher:q} --checkpoint {input.checkpoint}"
        " --store {input.store} --table {input.table} --out {output} 2> {log}"


rule plot_runtimes:
    input:
        runtime_records,
    output:
        report(
            "results/report/runtimes.png",
            caption="../report/runtimes.rst",
            category="Runtimes",
        ),
    log:
        "logs/report/plot_runtimes.log",
    conda:
        ENV
    params:
        jobs=runtime_args(),
    shell:
        "deo plot runtimes {params.jobs} --out {output} 2> {log}"


rule dump_views:
    input:
        unpack(distill_inputs),
    output:
        directory("results/views/{run}"),
    log:
        "logs/views/{run}.log",
    conda:
        ENV
    params:
        train=lambda wildcards: train_params(wildcards.run),
        teacher=teacher_params(),
        cache=teacher_cache_arg,
    shell:
        "deo views --train {params.train:q} --teacher {params.teacher:q} {params.cache}"
        " --store {input.store} --table {input.table} --out {output} --batches 1 2> {log}"


rule plot_views:
    input:
        "results/views/{run}",
    output:
        report(
            "results/report/views_{run}.png",
            caption="../report/views.rst",
            category="Training",
            subcategory="{run}",
        ),
    log:
        "logs/report/plot_views_{run}.log",
    conda:
        ENV
    shell:
        "deo plot views {input}/batch_0000.npz --out {output} 2> {log}"
