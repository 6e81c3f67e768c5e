rule mirror:
    output:
        directory(MIRROR),
    log:
        "logs/data/mirror.log",
    benchmark:
        "results/benchmarks/mirror.tsv"
    conda:
        ENV
    params:
        data=data_params("mirror", "sentinel", "rgb"),
    shell:
        "deo mirror --data {params.data:q} --out {output} 2> {log}"


rule preflight:
    input:
        mirror_input,
    output:
        json="results/data/preflight.json",
        md="results/data/preflight.md",
    log:
        "logs/data/preflight.log",
    benchmark:
        "results/benchmarks/preflight.tsv"
    conda:
        ENV
    # Only the hosts' sections are params (rerun triggers). The sections preflight reads for its
    # estimates (PREFLIGHT_SETTINGS: harmonise, selection, store) are passed outside params, so
    # changing a harmonise key reruns harmonise onward, never this check upstream of the download.
    params:
        data=data_params("sentinel", "rgb", "preflight"),
        sentinel_url=source_url("sentinel"),
        rgb_url=source_url("rgb"),
    run:
        shell(
            "deo preflight --data {params.data:q} --settings {settings:q}"
            " --sentinel-url {params.sentinel_url:q} --rgb-url {params.rgb_url:q}"
            " --out-json {output.json} --out-md {output.md} > {log} 2>&1",
            settings=PREFLIGHT_SETTINGS,
        )


rule fetch_sentinel:
    input:
        mirror_input,
        # ancient: a preflight rerun (its checks read harmonise keys) must not refetch
        preflight=ancient("results/data/preflight.json"),
    output:
        record="results/data/sentinel_fetch.csv",
    log:
        "logs/data/fetch_sentinel.log",
    benchmark:
        "results/benchmarks/fetch_sentinel.tsv"
    conda:
        ENV
    threads: 2
    params:
        data=data_params("sentinel", "fetch"),
        url=source_url("sentinel"),
        dest=SENTINEL_DIR,
    shell:
        "deo fetch-sentinel --data {params.data:q} --base-url {params.url:q}"
        " --dest {params.dest} --record {output.record} 2> {log}"


rule verify_sentinel:
    input:
        "results/data/sentinel_fetch.csv",
    output:
        "results/data/sentinel_verified.json",
    log:
        "logs/data/verify_sentinel.log",
    benchmark:
        "results/benchmarks/verify_sentinel.tsv"
    conda:
        ENV
    params:
        manifest=f"{SENTINEL_DIR}/manifest.json",
        rehash="--rehash" if DATA["fetch"].get("rehash") else "",
    shell:
        "deo verify --manifest {params.manifest} {params.rehash} --out {output} 2> {log}"


rule select_scenes:
    input:
        "results/data/sentinel_verified.json",
    output:
        "results/data/selection.parquet",
    log:
        "logs/data/select_scenes.log",
    benchmark:
        "results/benchmarks/select_scenes.tsv"
    conda:
        ENV
    params:
        data=data_params("sentinel", "selection"),
        csv_dir=SENTINEL_DIR,
    shell:
        "deo select --data {params.data:q} --csv-dir {params.csv_dir} --out {output} 2> {log}"


rule extract:
    input:
        verified="results/data/sentinel_verified.json",
        selection="results/data/selection.parquet",
    output:
        record="results/data/extracted.csv",
        skipped="results/data/extract_skipped.csv",
    log:
        "logs/data/extract.log",
    benchmark:
        "results/benchmarks/extract.tsv"
    conda:
        ENV
    params:
        data=data_params("sentinel"),
        archive=f"{SENTINEL_DIR}/{DATA['sentinel']['archive']}",
        dest=SCENES_DIR,
    shell:
        "deo extract --data {params.data:q} --archive {params.archive}"
        " --selection {input.selection} --dest {params.dest}"
        " --record {output.record} --skipped {output.skipped} 2> {log}"


rule fetch_rgb:
    input:
        mirror_input,
        selection="results/data/selection.parquet",
    output:
        record="results/data/rgb_fetch.csv",
    log:
        "logs/data/fetch_rgb.log",
    benchmark:
        "results/benchmarks/fetch_rgb.tsv"
    conda:
        ENV
    threads: 2
    params:
        data=data_params("fetch", "rgb"),
        url=source_url("rgb"),
        dest=RGB_DIR,
    shell:
        "deo fetch-rgb --data {params.data:q} --selection {input.selection}"
        " --base-url {params.url:q} --dest {params.dest} --record {output.record} 2> {log}"


rule pair:
    input:
        unpack(pair_inputs),
    output:
        pairs="results/data/pairs.parquet",
        rejects="results/data/rejects/pair.csv",
        counts="results/data/pair_counts.json",
    log:
        "logs/data/pair.log",
    benchmark:
        "results/benchmarks/pair.tsv"
    conda:
        ENV
    params:
        data=data_params("sentinel", "rgb"),
        sentinel_root=SCENES_DIR,
        rgb=rgb_args,
    shell:
        "deo pair --data {params.data:q} --selection {input.selection}"
        " --sentinel-root {params.sentinel_root} --extract-skipped {input.skipped}"
        " {params.rgb} --out {output.pairs} --rejects {output.rejects}"
        " --counts {output.counts} 2> {log}"


rule harmonise:
    input:
        "results/data/pairs.parquet",
    output:
        shard=temp(directory("results/data/shards/{shard}.zarr")),
        rejects="results/data/rejects/harmonise_{shard}.csv",
    log:
        "logs/data/harmonise_{shard}.log",
    benchmark:
        "results/benchmarks/harmonise_{shard}.tsv"
    conda:
        ENV
    resources:
        mem_mb=2000,
    params:
        data=data_params("harmonise", "rgb"),
    shell:
        "deo harmonise --data {params.data:q} --pairs {input} --shard {wildcards.shard}"
        " --out {output.shard} --rejects {output.rejects} 2> {log}"


rule merge:
    input:
        pairs="results/data/pairs.parquet",
        shards=expand("results/data/shards/{shard}.zarr", shard=shard_ids()),
        rejects=[
            "results/data/rejects/pair.csv",
            *expand("results/data/rejects/harmonise_{shard}.csv", shard=shard_ids()),
        ],
    output:
        store=directory("results/data/pretrain.zarr"),
        table="results/data/pretrain.parquet",
        rejects=report(
            "results/data/rejects.csv",
            caption="../report/rejects.rst",
            category="Data",
        ),
        counts="results/data/counts.json",
    log:
        "logs/data/merge.log",
    benchmark:
        "results/benchmarks/merge.tsv"
    conda:
        ENV
    threads: DATA["store"]["merge_threads"]
    params:
        data=data_params(
            "mirror", "sentinel", "rgb", "harmonise", "store", "max_reject_fraction"
        ),
    shell:
        "deo merge --data {params.data:q} --pairs {input.pairs} --shards {input.shards}"
        " --reject-tables {input.rejects} --out-store {output.store}"
        " --out-table {output.table} --rejects {output.rejects}"
        " --counts {output.counts} 2> {log}"


rule stats:
    input:
        store="results/data/pretrain.zarr",
        table="results/data/pretrain.parquet",
    output:
        "results/data/stats.json",
    log:
        "logs/data/stats.log",
    benchmark:
        "results/benchmarks/stats.tsv"
    conda:
        ENV
    shell:
        "deo stats --store {input.store} --table {input.table} --out {output} 2> {log}"
