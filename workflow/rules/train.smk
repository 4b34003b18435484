rule train:
    input:
        crops=expand(f"{CROPS_DIR}/{{subset}}.h5", subset=SUBSETS),
        splits=trainable_splits,  # f"{RESULTS}/splits.tsv", refused at the dry run for a split not trainable
        excluded=training_excluded_files,
    output:
        # not protected(): Snakemake refuses to rerun a job whose protected output a non-root user cannot
        # write, which is every documented retrain
        model=f"{FOLDS_DIR}/{{fold}}/model.pt",
        history=f"{FOLDS_DIR}/{{fold}}/history.tsv",
        selection=f"{FOLDS_DIR}/{{fold}}/selection_predictions.tsv",
    log:
        "logs/train/{fold}.log",
    benchmark:
        "benchmarks/runs/train/{fold}.tsv"
    wildcard_constraints:
        fold=r"0|[1-9]\d*",  # one spelling per fold: folds/00 was a second fold 0
    conda:
        "../../envs/luna.yaml"
    threads: 2
    resources:
        gpu=config["train"]["gpus"],  # torchrun starts one process per GPU when > 1
        mem_mb=8000,
    params:
        # what shapes the model: a change reruns train and predict (not train.num_workers, speed only; not
        # split.run_folds: adding a fold never retrains a finished one)
        train=settings("train"),
        speed_keys=SPEED_KEYS["train"],
        selection_fraction=config["split"]["selection_fraction"],
        # train.skip_excluded's findings (synthetic: written with the scans the crops are made from)
        annotations_excluded=training_excluded(),
        # resumable state (optimizer, sampler, RNG) lives outside the declared outputs, which Snakemake
        # deletes before a job starts; keyed by the config and the fold, so a changed hyper-parameter
        # starts afresh
        state=lambda wc: state_dir(
            f"train-fold{wc.fold}",
            **training_data_settings(),
            crops=crop_settings(),
            split=fold_settings(),
            train=settings("train"),
        ),
        tb_dir=lambda wc: f"{FOLDS_DIR}/{wc.fold}/tensorboard",
    script:
        "../../scripts/train.py"
