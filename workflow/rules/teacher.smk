rule cache_teacher:
    input:
        unpack(cache_inputs),
    output:
        temp("results/teacher/{variant}/parts/{part}.json"),
    log:
        "logs/teacher/cache_{variant}_{part}.log",
    benchmark:
        "results/benchmarks/cache_teacher_{variant}_{part}.tsv"
    conda:
        ENV
    threads: 2
    resources:
        gpu=0,
        runtime=60,
    params:
        teacher=teacher_params(),
        views=lambda wildcards: cache_views_params(wildcards.variant),
        cache=cache_params(),
        work=lambda wildcards: cache_work_dir(wildcards.variant),
    shell:
        "deo cache-teacher --teacher {params.teacher:q} --views {params.views:q}"
        " --cache {params.cache:q} --store {input.store} --table {input.table}"
        " --part {wildcards.part} --work {params.work} --out {output} 2> {log}"


rule finalise_teacher_cache:
    input:
        expand("results/teacher/{{variant}}/parts/{part}.json", part=cache_part_ids()),
    output:
        directory("results/teacher/{variant}.zarr"),
    log:
        "logs/teacher/finalise_{variant}.log",
    benchmark:
        "results/benchmarks/finalise_teacher_cache_{variant}.tsv"
    conda:
        ENV
    shell:
        "deo finalise-teacher-cache --parts {input} --out {output} 2> {log}"
