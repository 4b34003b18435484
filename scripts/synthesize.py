"""Rule synthesize: config `synthetic:` -> a LUNA16-format data set (thin: maps to luna.synth.SynthApp)."""

from luna.runner import config_argv, run_rule
from luna.synth import SynthApp

sm = snakemake  # noqa: F821 - injected by Snakemake
run_rule(SynthApp, ["--out", sm.output[0], "--jobs", sm.threads, *config_argv(sm.params.synthetic)], sm.log[0])
