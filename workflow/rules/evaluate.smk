rule demo_benchmarks:
    output:
        directory(DEMO_BENCHMARKS),
    log:
        "logs/evaluate/demo_benchmarks.log",
    benchmark:
        "results/benchmarks/demo_benchmarks.tsv"
    conda:
        ENV
    params:
        seed=EVAL["demo_seed"],
    shell:
        "deo demo-benchmarks --seed {params.seed} --out {output} 2> {log}"


rule prepare_benchmark:
    input:
        demo_input,
    output:
        "results/evaluate/{benchmark}/prepared.json",
    log:
        "logs/evaluate/prepare_{benchmark}.log",
    benchmark:
        "results/benchmarks/prepare_{benchmark}.tsv"
    conda:
        ENV
    params:
        root=lambda wildcards: benchmark_root(wildcards.benchmark),
        download="--download" if EVAL["download"] else "",
    shell:
        "deo prepare-benchmark --name {wildcards.benchmark} --root {params.root}"
        " {params.download} --record {output} 2> {log}"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        "results/evaluate/{benchmark}/{model}/seed{seed}.csv",
    log:
        "logs/evaluate/{benchmark}_{model}_seed{seed}.log",
    benchmark:
        "results/benchmarks/evaluate_{benchmark}_{model}_seed{seed}.tsv"
    conda:
        ENV
    threads: 1
    resources:
        gpu=0,
        runtime=120,
    params:
        job=evaluate_job,
        root=lambda wildcards: benchmark_root(wildcards.benchmark),
    shell:
        "deo evaluate --job {params.job:q} --root {params.root} --out {output} 2> {log}"


rule summarise:
    input:
        results=available_results,
        paper="config/paper_results.csv",
    output:
        csv="results/summary.csv",
        md="results/summary.md",
        html=report(
            "results/summary.html",
            caption="../report/summary.rst",
            category="Results",
        ),
    log:
        "logs/evaluate/summarise.log",
    benchmark:
        "results/benchmarks/summarise.tsv"
    conda:
        ENV
    params:
        expected=json.dumps(expected_jobs()),
        reference=EVAL["reference_model"],
        unavailable=unavailable_benchmarks(),
    shell:
        "deo summarise --expected {params.expected:q} --results {input.results}"
        " --paper {input.paper} --reference {params.reference} --out-csv {output.csv}"
        " --out-md {output.md} --out-html {output.html}"
        " --unavailable {params.unavailable} 2> {log}"


rule ablation:
    input:
        results=available_ablation_results,
        paper="config/paper_ablation.csv",
    output:
        csv="results/ablation.csv",
        md="results/ablation.md",
        html=report(
            "results/ablation.html",
            caption="../report/ablation.rst",
            category="Results",
        ),
    log:
        "logs/evaluate/ablation.log",
    benchmark:
        "results/benchmarks/ablation.tsv"
    conda:
        ENV
    params:
        expected=json.dumps(ablation_jobs()),
        runs=ABLATION_RUNS,
        unavailable=unavailable_benchmarks(),
    shell:
        "deo ablation --expected {params.expected:q} --results {input.results}"
        " --runs {params.runs} --paper {input.paper} --out-csv {output.csv}"
        " --out-md {output.md} --out-html {output.html}"
        " --unavailable {params.unavailable} 2> {log}"


rule results_figure:
    input:
        unpack(results_figure_inputs),
    output:
        report(
            "results/report/results.png",
            caption="../report/results.rst",
            category="Results",
        ),
    log:
        "logs/report/results.log",
    conda:
        ENV
    params:
        models=list(MAIN_MODELS),
        ablation=lambda wildcards, input: (
            f"--ablation {input.ablation}" if "ablation" in input.keys() else ""
        ),
    shell:
        "deo plot-results --summary {input.summary} {params.ablation}"
        " --models {params.models} --out {output} 2> {log}"
