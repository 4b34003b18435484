rule predict:
    input:
        model=f"{FOLDS_DIR}/{{fold}}/model.pt",
        crops=expand(f"{CROPS_DIR}/{{subset}}.h5", subset=SUBSETS),
        splits=trainable_splits,  # f"{RESULTS}/splits.tsv", refused for a split not trainable
    output:
        f"{FOLDS_DIR}/{{fold}}/predictions.tsv",
    log:
        "logs/predict/{fold}.log",
    benchmark:
        "benchmarks/runs/predict/{fold}.tsv"
    wildcard_constraints:
        fold=r"0|[1-9]\d*",  # one spelling per fold: folds/00 was a second fold 0
    conda:
        "../../envs/luna.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
    script:
        "../../scripts/predict.py"


FROC_OUTPUTS = (
    {
        "froc": report(
            f"{VALIDATION_DIR}/froc.tsv",
            caption="../report/froc_table.rst",
            category="Test folds",
            labels={"table": "FROC curve"},
        ),
        "froc_plot": report(
            f"{VALIDATION_DIR}/froc.png",
            caption="../report/froc.rst",
            category="Plots",
            labels={"plot": "FROC"},
        ),
    }
    if DATASET["annotations"]
    else {}
)
CI_OUTPUTS = (
    {
        "ci": report(
            f"{VALIDATION_DIR}/metrics_ci.tsv",
            caption="../report/metrics_ci.rst",
            category="Test folds",
            labels={"table": "CPM confidence intervals"},
        )
    }
    if DATASET["annotations"] and config["validate"]["bootstrap"] > 0
    else {}
)


rule evaluate:
    input:
        unpack(lambda wc: validation_tables()),
        models=fold_files("model.pt"),
        histories=fold_files("history.tsv"),
        predictions=fold_files("predictions.tsv"),
        splits=trainable_run_splits,  # f"{RESULTS}/splits.tsv", refused for a split not trainable
    output:
        **FROC_OUTPUTS,
        **CI_OUTPUTS,
        # predictions.tsv and submission.csv stay out of the HTML report (which embeds every item: ~230 MB for
        # LUNA16's 755,000 candidates); metrics.rst names them
        predictions=f"{VALIDATION_DIR}/predictions.tsv",
        metrics=report(
            f"{VALIDATION_DIR}/metrics.tsv",
            caption="../report/metrics.rst",
            category="Test folds",
            labels={"table": "metrics"},
        ),
        submission=f"{VALIDATION_DIR}/submission.csv",
        roc=report(
            f"{VALIDATION_DIR}/roc.png",
            caption="../report/roc.rst",
            category="Plots",
            labels={"plot": "ROC"},
        ),
        pr=report(
            f"{VALIDATION_DIR}/pr.png",
            caption="../report/pr.rst",
            category="Plots",
            labels={"plot": "precision-recall"},
        ),
        curves=report(
            f"{VALIDATION_DIR}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Plots",
            labels={"plot": "training curves"},
        ),
    log:
        "logs/evaluate.log",
    benchmark:
        "benchmarks/runs/evaluate.tsv"
    conda:
        "../../envs/luna.yaml"
    params:
        evaluate=settings("validate"),
        folds=lambda wildcards, input: [str(Path(m).parent) for m in input.models],
        out_dir=lambda wildcards, output: str(Path(output.predictions).parent),
        annotations=table_path(DATASET["annotations"]),
        annotations_excluded=table_path(DATASET["annotations_excluded"]),
    script:
        "../../scripts/evaluate.py"
