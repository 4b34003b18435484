"""Rule crops: one subset's scans -> results/crops/{subset}.h5 (thin: maps the rule to luna.crops.CropApp)."""

from luna.crops import CropApp
from luna.runner import run_rule

c = snakemake.params.crops  # noqa: F821 - injected by Snakemake
run_rule(
    CropApp,
    [
        "--candidates", snakemake.input.candidates,  # noqa: F821
        "--root", snakemake.params.root,  # noqa: F821
        "--subset", snakemake.wildcards.subset,  # noqa: F821
        "--out", snakemake.output.store,  # noqa: F821
        "--skipped", snakemake.output.skipped,  # noqa: F821
        "--cache-dir", f"{snakemake.config['crops']['cache']}/{snakemake.wildcards.subset}",  # noqa: F821
        "--threads", snakemake.threads,  # noqa: F821
        "--shape", *c["shape"],
        "--hu-window", *c["hu_window"],
        "--on-bad-scan", c["on_bad_scan"],
        "--compression", c["compression"],
        "--allow-empty-subset",  # the subset folders were checked at the dry run; a list may skip one
    ],
    snakemake.log[0],  # noqa: F821
)
