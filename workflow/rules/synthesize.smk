if SYNTHETIC:

    rule synthesize:
        output:
            directory(DATA_ROOT),
        params:
            synthetic=config["synthetic"],
        threads: 2
        log:
            "logs/synthesize.log",
        benchmark:
            "benchmarks/runs/synthesize.tsv"
        conda:
            "../../envs/luna.yaml"
        script:
            "../../scripts/synthesize.py"
