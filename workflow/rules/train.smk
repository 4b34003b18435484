rule train:
    input:
        crops=expand(f"{CROPS_DIR}/{{subset}}.h5", subset=SUBSETS),
        splits=f"{RESULTS}/splits.tsv",
    output:
        model=protected(f"{MODEL_DIR}/model.pt"),
        history=f"{MODEL_DIR}/history.tsv",
    log:
        "logs/train.log",
    benchmark:
        "benchmarks/runs/train.tsv"
    conda:
        "../../envs/luna.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        # what shapes the model: a change reruns train and validate (not train.num_workers, speed only)
        train=train_settings(),
        # resumable state (optimizer, sampler, RNG) lives outside the declared outputs, which Snakemake
        # deletes before a job starts; keyed by the config so a changed hyper-parameter starts afresh
        state=state_dir(
            "train",
            dataset=config["dataset"],
            synthetic=config["synthetic"],
            crops=config["crops"],
            split=config["split"],
            train=train_settings(),
        ),
        tb_dir=f"{MODEL_DIR}/tensorboard",
    script:
        "../../scripts/train.py"
