rule candidates:
    input:
        unpack(lambda wc: dataset_inputs()),
    output:
        f"{RESULTS}/candidates.tsv",
    log:
        "logs/candidates.log",
    benchmark:
        "benchmarks/runs/candidates.tsv"
    conda:
        "../../envs/luna.yaml"
    params:
        root=DATA_ROOT,
        candidates=DATASET["candidates"],
        annotations=DATASET["annotations"] or "",
        subsets=SUBSETS,
    script:
        "../../scripts/candidates.py"


rule split:
    input:
        unpack(lambda wc: dataset_inputs()),
    output:
        f"{RESULTS}/splits.tsv",
    log:
        "logs/split.log",
    benchmark:
        "benchmarks/runs/split.tsv"
    conda:
        "../../envs/luna.yaml"
    params:
        root=DATA_ROOT,
        subsets=SUBSETS,
        folds=config["split"]["folds"],
    script:
        "../../scripts/split.py"
