"""Rule candidates: CSVs -> results/candidates.tsv (thin: maps the rule to luna.candidates.CandidatesApp)."""

from luna.candidates import CandidatesApp
from luna.runner import run_rule

p = snakemake.params  # noqa: F821 - injected by Snakemake
run_rule(
    CandidatesApp,
    ["--root", p.root, "--candidates", p.candidates, "--annotations", p.annotations,
     "--subsets", *p.subsets, "--out", snakemake.output[0]],  # noqa: F821
    snakemake.log[0],  # noqa: F821
)
