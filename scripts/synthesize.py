"""Rule synthesize: config `synthetic:` -> a LUNA16-format data set (thin: maps to luna.synth.SynthApp)."""

from luna.runner import run_rule
from luna.synth import SynthApp

sm = snakemake  # noqa: F821 - injected by Snakemake
argv = ["--out", sm.output[0], "--jobs", sm.threads]
for key, value in sm.params.synthetic.items():
    option = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        argv.append(option if value else "--no-" + option[2:])
    elif isinstance(value, (list, tuple)):
        argv += [option, *value]
    else:
        argv += [option, value]
run_rule(SynthApp, argv, sm.log[0])
