"""luna: LUNA16 scans -> candidate crops -> one LunaModel per test fold -> pooled test-fold metrics (FROC/CPM, submission).

Run: snakemake --cores 8 --resources gpu=1        (see README.md; SLURM: --profile profiles/slurm)
"""

from snakemake.utils import min_version

min_version("9.0")

from luna.runner import check_yaml_file

# the shipped config beside this Snakefile, also when run with -s <repo>/Snakefile --directory <workdir> (a relative
# path would be looked up in the workdir, and silently skipped there when a --configfile is given)
# a malformed config: one line naming file and line (Snakemake's own message names neither)
check_yaml_file(f"{workflow.basedir}/config/config.yaml")


configfile: f"{workflow.basedir}/config/config.yaml"


report: "workflow/report/workflow.rst"


# `gpu` is a per-node resource: on a cluster each job's gpu=1 is checked against its node, not summed
# over all running jobs (locally the two are the same).
resource_scopes:
    gpu="local",


include: "workflow/rules/common.smk"
include: "workflow/rules/synthesize.smk"
include: "workflow/rules/candidates.smk"
include: "workflow/rules/crops.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/validate.smk"


localrules:
    all,
    candidates,
    split,


rule all:
    default_target: True
    input:
        # every file the evaluate job writes: a deleted plot or interval table is remade, not missing from the report
        evaluated_files,


onsuccess:
    print_summary()
