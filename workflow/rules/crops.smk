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
        # not crops.cache: where the resume cache lives changes no crop (the script reads it from the config)
        crops=crop_settings(),
    script:
        "../../scripts/crops.py"
