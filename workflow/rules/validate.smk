FROC_OUTPUTS = (
    {
        "froc": report(
            f"{VALIDATION_DIR}/froc.tsv",
            caption="../report/froc_table.rst",
            category="Validation",
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


rule validate:
    input:
        unpack(lambda wc: validation_tables()),
        model=f"{MODEL_DIR}/model.pt",
        history=f"{MODEL_DIR}/history.tsv",
        crops=expand(f"{CROPS_DIR}/{{subset}}.h5", subset=SUBSETS),
        splits=f"{RESULTS}/splits.tsv",
    output:
        **FROC_OUTPUTS,
        predictions=report(
            f"{VALIDATION_DIR}/predictions.tsv",
            caption="../report/predictions.rst",
            category="Validation",
            labels={"table": "predictions"},
        ),
        metrics=report(
            f"{VALIDATION_DIR}/metrics.tsv",
            caption="../report/metrics.rst",
            category="Validation",
            labels={"table": "metrics"},
        ),
        submission=report(
            f"{VALIDATION_DIR}/submission.csv",
            caption="../report/submission.rst",
            category="Validation",
            labels={"table": "LUNA16 submission"},
        ),
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
        # froc.tsv and froc.png need annotations (FROC/CPM); without them they are not made
        curves=report(
            f"{VALIDATION_DIR}/training_curves.png",
            caption="../report/training_curves.rst",
            category="Plots",
            labels={"plot": "training curves"},
        ),
    log:
        "logs/validate.log",
    benchmark:
        "benchmarks/runs/validate.tsv"
    conda:
        "../../envs/luna.yaml"
    threads: 2
    resources:
        gpu=1,
        mem_mb=8000,
    params:
        validate=config["validate"],
        out_dir=lambda wildcards, output: str(Path(output.predictions).parent),
        annotations=table_path(DATASET["annotations"]),
        annotations_excluded=table_path(DATASET["annotations_excluded"]),
    script:
        "../../scripts/validate.py"
