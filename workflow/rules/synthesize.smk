if SYNTHETIC:

    rule synthesize:
        output:
            directory(DATA_ROOT),
        log:
            "logs/synthesize.log",
        benchmark:
            "benchmarks/runs/synthesize.tsv"
        conda:
            "../../envs/luna.yaml"
        threads: 2
        params:
            synthetic=config["synthetic"],
        script:
            "../../scripts/synthesize.py"
