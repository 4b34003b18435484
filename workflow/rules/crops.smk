rule crops:
    input:
        unpack(subset_inputs),
        candidates=f"{RESULTS}/candidates.tsv",
    output:
        store=f"{CROPS_DIR}/{{subset}}.h5",
        skipped=f"{CROPS_DIR}/{{subset}}.skipped.tsv",
    log:
        "logs/crops/{subset}.log",
    benchmark:
        "benchmarks/runs/crops/{subset}.tsv"
    conda:
        "../../envs/luna.yaml"
    threads: 4
    resources:
        mem_mb=4000,
    params:
        root=DATA_ROOT,
        crops=config["crops"],
        cache=lambda wc: f"{config['crops']['cache']}/{wc.subset}",
    script:
        "../../scripts/crops.py"
