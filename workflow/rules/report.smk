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
