"""The SLURM profile on a REAL single-node SLURM cluster (munge + slurmctld + slurmd, no mock).

The cluster is started by tests/slurm/cluster.py under a temp folder (seconds; installs Debian's
slurm-wlm + munge with apt-get when missing) and stopped by its pid files afterwards. It needs root:
as another user the tests skip, unless LUNA_REQUIRE_SLURM=1 (CI sets it), which turns a cluster
that cannot start into a failure.

What is proven:
- a toy workflow through `--profile profiles/slurm`: every non-local job went through sbatch (the
  SLURM job id that Snakemake logged is a COMPLETED job of this cluster, named after the run and
  commented with its rule), each `gpu: 1` job got one GPU (`--gpus=1`, CUDA_VISIBLE_DEVICES=0), `gpu`
  is counted per job (profile's resource scope), local rules ran in the Snakemake process, and a
  failing SLURM job fails the run instead of hanging;
- the real workflow (repo Snakefile) on a tiny synthetic config: the crop store made through SLURM
  equals, dataset by dataset, the one a local run makes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "profiles" / "slurm"
CLUSTER_SCRIPT = REPO / "tests" / "slurm" / "cluster.py"
BIN = Path(sys.executable).parent
REQUIRE_SLURM = os.environ.get("LUNA_REQUIRE_SLURM", "") == "1"

# Test-cluster settings given on the command line on top of the profile: poll soon (jobs here take
# seconds, the profile is tuned for a site) and fit the node's 2 CPUs (sbatch refuses more).
TEST_CLUSTER_ARGS = ("--slurm-init-seconds-before-status-checks", "2", "--max-threads", "2")
RUN_TIMEOUT_S = 600

# What the real-workflow test builds: the crop store (and the cheap local split table).
WORKFLOW_TARGETS = ("results/crops/subset0.h5", "results/splits.tsv")
COMPARED_STORES = ("results/crops/subset0.h5",)


# --------------------------------------------------------------------------------------------
# helpers


def _cluster_module():
    """tests/slurm/cluster.py, imported by path (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("luna_test_slurm_cluster", CLUSTER_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(tmp_path: Path) -> dict:
    """The smallest synthetic config that still makes a crop store: 1 subset of 2 scans.

    tmp_path is the run's working folder (every path in the config is relative to it).
    """
    del tmp_path  # the defaults (data/synthetic, results/...) are relative to the working folder
    return {
        "dataset": {"source": "synthetic", "root": "data/synthetic"},
        "synthetic": {
            "n_subsets": 1,
            "scans_per_subset": 2,
            "seed": 3,
            "negatives_per_positive": 4,
            "size_xy_min": 96,
            "size_xy_max": 128,
            "spacing_xy_min_mm": 0.7,
            "extent_z_mm_min": 60.0,
            "extent_z_mm_max": 80.0,
        },
        "crops": {"shape": [32, 48, 48]},
        "split": {"folds": 2},
    }


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_snakemake(
    cmd: list[str], workdir: Path, env: dict[str, str], timeout_s: float = RUN_TIMEOUT_S
) -> tuple[int, str]:
    """Run snakemake, returning (exit code, stdout+stderr); the output is also kept in workdir/run.log."""
    proc = subprocess.run(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout_s
    )
    (workdir / "run.log").write_text(proc.stdout)
    return proc.returncode, proc.stdout


def own_log(log: str) -> str:
    """The submitting Snakemake's own lines: failed jobs' logs, embedded by --show-failed-logs, cut out."""
    return re.sub(r"^Logfile [^\n]*:\n={80}\n.*?^={80}\n", "", log, flags=re.MULTILINE | re.DOTALL)


def slurm_run_id(log: str) -> str:
    match = re.search(r"^SLURM run ID: (\S+)", log, re.MULTILINE)
    assert match, f"no 'SLURM run ID' in the snakemake log:\n{log[-3000:]}"
    return match.group(1)


def executed_jobs(log: str) -> dict[int, tuple[str, bool]]:
    """Snakemake job id -> (rule, ran locally) from the job headers ('rule x:' / 'localrule x:', 'jobid: n')."""
    jobs = {}
    pattern = r"^(local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)$"
    for match in re.finditer(pattern, own_log(log), re.MULTILINE):
        jobs[int(match.group(3))] = (match.group(2), match.group(1) == "local")
    return jobs


def submitted_jobs(log: str) -> dict[int, list[tuple[str, str]]]:
    """Snakemake job id -> [(SLURM job id, rule), ...] in submission order (a retry adds one)."""
    submitted: dict[int, list[tuple[str, str]]] = {}
    pattern = r"Job (\d+) has been submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/"
    for match in re.finditer(pattern, own_log(log)):
        submitted.setdefault(int(match.group(1)), []).append((match.group(2), match.group(3)))
    return submitted


def scontrol_job(env: dict[str, str], slurm_id: str) -> dict[str, str]:
    """`scontrol show job` of one job as key -> value (the cluster keeps finished jobs 10 minutes)."""
    proc = subprocess.run(
        ["scontrol", "--oneliner", "show", "job", slurm_id], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"scontrol show job {slurm_id}: {proc.stderr}"
    return dict(re.findall(r"(\w[\w/:]*)=(\S*)", proc.stdout))


def assert_every_cluster_job_went_through_sbatch(log: str, env: dict[str, str]) -> dict[int, list[tuple[str, str]]]:
    """Each non-local job has a SLURM job id that this cluster ran for this run and rule; local ones have none."""
    executed = executed_jobs(log)
    submitted = submitted_jobs(log)
    remote = {jobid for jobid, (_, local) in executed.items() if not local}
    local = {jobid for jobid, (_, is_local) in executed.items() if is_local}
    assert remote, f"no job ran on the cluster:\n{log[-3000:]}"
    assert (
        set(submitted) == remote
    ), f"non-local jobs {sorted(remote)} vs jobs submitted to SLURM {sorted(submitted)}:\n{log[-3000:]}"
    assert not local & set(submitted)
    run_id = slurm_run_id(log)
    for jobid, submissions in submitted.items():
        rule = executed[jobid][0]
        for slurm_id, logged_rule in submissions:
            assert logged_rule == rule
            info = scontrol_job(env, slurm_id)
            assert info["JobName"] == run_id, info
            # the plugin comments each job with its rule (and wildcards: rule_crops_wildcards_subset0)
            assert re.fullmatch(rf"rule_{rule}(_wildcards_\S+)?", info["Comment"]), info
    return submitted


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A running single-node cluster (the cluster module's Layout); stopped by pid file at the end."""
    cluster = _cluster_module()

    def unavailable(reason: str):
        if REQUIRE_SLURM:
            pytest.fail(f"LUNA_REQUIRE_SLURM=1 but no SLURM test cluster: {reason}")
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("starting a SLURM test cluster needs root")
    state_dir = tmp_path_factory.mktemp("slurm")
    try:
        t0 = time.monotonic()
        layout = cluster.start(state_dir)
        print(f"SLURM test cluster up in {time.monotonic() - t0:.1f} s under {state_dir}")
    except cluster.ClusterError as err:
        cluster.stop(state_dir)
        unavailable(f"SLURM test cluster did not start: {err}")
    try:
        yield layout
    finally:
        cluster.stop(state_dir)


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster) -> dict[str, str]:
    """Environment of a submitting shell: the cluster's SLURM_CONF and client wrappers, then the venv's tools."""
    env = slurm_cluster.env()
    path = env["PATH"].split(os.pathsep)
    env["PATH"] = os.pathsep.join([path[0], str(BIN), *path[1:]])
    env["PYTHONUNBUFFERED"] = "1"
    return env


TOY_SNAKEFILE = textwrap.dedent("""\
    localrules:
        all,
        gather,


    rule all:
        input:
            "gathered.txt",


    rule gpu_job:
        output:
            "gpu{i}.txt",
        resources:
            gpu=1,
        shell:
            'echo "job=${{SLURM_JOB_ID:-none}} cuda=${{CUDA_VISIBLE_DEVICES:-unset}}" > {output}'


    rule cpu_job:
        output:
            "cpu.txt",
        shell:
            'echo "job=${{SLURM_JOB_ID:-none}} cuda=${{CUDA_VISIBLE_DEVICES:-unset}}" > {output}'


    rule gather:
        input:
            "gpu1.txt",
            "gpu2.txt",
            "cpu.txt",
        output:
            "gathered.txt",
        shell:
            'cat {input} > {output}; echo "local job=${{SLURM_JOB_ID:-none}}" >> {output}'


    rule fails:
        output:
            "never.txt",
        shell:
            "echo this job fails on purpose >&2; exit 3"
    """)


def slurm_job_count(env: dict[str, str]) -> int:
    """Jobs the cluster lists (finished ones included: it keeps them 10 minutes)."""
    proc = subprocess.run(
        ["squeue", "--noheader", "--states=all", "--format=%i"], env=env, capture_output=True, text=True, timeout=30
    )
    return len(proc.stdout.split())


@pytest.fixture(scope="module")
def toy_runs(slurm_env, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Two runs of a toy workflow through profiles/slurm, side by side (each mostly waits for polls):
    'ok' builds `all` (two GPU jobs and one CPU job on SLURM, two local rules) under `--resources gpu=1`;
    'fails' builds a target whose job exits 3, without the profile's retry (each poll that finds no
    finished job makes the plugin wait 10 s longer, so a retry would cost about a minute). 'fails' is
    submitted first, so that its job does not queue behind the others on the 2-CPU node."""
    runs = {}
    try:
        for name, args in (("fails", ["fails", "--retries", "0"]), ("ok", ["all", "--resources", "gpu=1"])):
            workdir = tmp_path_factory.mktemp(f"toy_{name}")
            (workdir / "Snakefile").write_text(TOY_SNAKEFILE)
            cmd = [str(BIN / "snakemake"), *args, "--profile", str(PROFILE), *TEST_CLUSTER_ARGS]
            jobs_before = slurm_job_count(slurm_env)
            with open(workdir / "run.log", "w") as log:
                proc = subprocess.Popen(cmd, cwd=workdir, env=slurm_env, stdout=log, stderr=subprocess.STDOUT)
            runs[name] = {"workdir": workdir, "proc": proc}
            deadline = time.monotonic() + 60
            while name == "fails" and proc.poll() is None and time.monotonic() < deadline:
                if slurm_job_count(slurm_env) > jobs_before:
                    break
                time.sleep(0.5)
        for run in runs.values():
            run["returncode"] = run["proc"].wait(timeout=RUN_TIMEOUT_S)
            run["log"] = (run["workdir"] / "run.log").read_text()
    finally:
        for run in runs.values():
            if run["proc"].poll() is None:
                run["proc"].kill()
                run["proc"].wait()
    return runs


# --------------------------------------------------------------------------------------------
# toy workflow


def test_toy_cluster_jobs_went_through_sbatch(toy_runs, slurm_env):
    ok = toy_runs["ok"]
    assert ok["returncode"] == 0, ok["log"][-5000:]
    submitted = assert_every_cluster_job_went_through_sbatch(ok["log"], slurm_env)
    assert sorted(rule for subs in submitted.values() for _, rule in subs) == ["cpu_job", "gpu_job", "gpu_job"]
    for submissions in submitted.values():
        assert len(submissions) == 1
        info = scontrol_job(slurm_env, submissions[0][0])
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info


def test_toy_gpu_jobs_got_one_gpu_each(toy_runs, slurm_env):
    workdir = toy_runs["ok"]["workdir"]
    slurm_ids = {}
    for name in ("gpu1", "gpu2", "cpu"):
        job, cuda = (workdir / f"{name}.txt").read_text().split()
        slurm_ids[name] = job.removeprefix("job=")
        assert cuda == ("cuda=unset" if name == "cpu" else "cuda=0"), name  # the node's one (fake) GPU
    for name in ("gpu1", "gpu2"):
        assert scontrol_job(slurm_env, slurm_ids[name])["TresPerJob"] == "gres:gpu:1"  # sbatch --gpus=1
    assert "TresPerJob" not in scontrol_job(slurm_env, slurm_ids["cpu"])
    submitted = {slurm_id for subs in submitted_jobs(toy_runs["ok"]["log"]).values() for slurm_id, _ in subs}
    assert submitted == set(slurm_ids.values())


def test_toy_gpu_counted_per_job_not_per_cluster(toy_runs):
    """Profile's `set-resource-scopes: gpu: local`: under `--resources gpu=1` both GPU jobs are submitted
    at once (SLURM, not Snakemake, shares the GPUs out); a global scope would submit them one by one."""
    log = own_log(toy_runs["ok"]["log"])
    first_finished = log.index("Finished jobid")
    submissions = [m.start() for m in re.finditer(r"has been submitted with SLURM jobid", log)]
    assert len(submissions) == 3 and max(submissions) < first_finished, log[-4000:]


def test_toy_local_rules_ran_in_snakemake(toy_runs):
    ok = toy_runs["ok"]
    gathered = (ok["workdir"] / "gathered.txt").read_text().splitlines()
    assert gathered[-1] == "local job=none"
    assert len(gathered) == 4 and all(re.fullmatch(r"job=\d+ cuda=\S+", line) for line in gathered[:3])
    local_rules = sorted(rule for rule, local in executed_jobs(ok["log"]).values() if local)
    assert local_rules == ["all", "gather"]


def test_toy_failing_slurm_job_fails_the_run(toy_runs, slurm_env):
    """The status command sees the job FAILED and Snakemake stops with an error (it does not hang)."""
    run = toy_runs["fails"]
    log = run["log"]
    assert run["returncode"] != 0, log[-3000:]
    assert not (run["workdir"] / "never.txt").exists()
    (fails_jobid,) = executed_jobs(log)
    submissions = submitted_jobs(log)[fails_jobid]
    assert len(submissions) == 1, submissions
    for slurm_id, _ in submissions:
        info = scontrol_job(slurm_env, slurm_id)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "1:0"), info
        assert f"SLURM-job '{slurm_id}' failed, SLURM status is: 'FAILED'" in log
    assert "this job fails on purpose" in log  # the failed job's log is shown (show-failed-logs)


# --------------------------------------------------------------------------------------------
# the real workflow


def h5_contents(path: Path) -> tuple[dict, dict]:
    """(dataset name -> array, object name -> attributes) of an HDF5 file, every group walked."""
    import h5py

    datasets, attributes = {}, {}
    with h5py.File(path, "r") as store:
        attributes["/"] = dict(store.attrs)

        def visit(name, obj):
            attributes[name] = dict(obj.attrs)
            if isinstance(obj, h5py.Dataset):
                datasets[name] = obj[()]

        store.visititems(visit)
    return datasets, attributes


def assert_same_attrs(a: dict, b: dict, where: str) -> None:
    import numpy as np

    assert a.keys() == b.keys(), f"{where}: attribute names differ"
    for key in a:
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), f"{where}: attribute {key} differs"


def test_workflow_crops_through_slurm_equal_local_run(slurm_env, tmp_path):
    import numpy as np

    snakefile = REPO / "Snakefile"
    local_dir, slurm_dir = tmp_path / "local", tmp_path / "slurm"

    def command(workdir: Path, *extra: str) -> list[str]:
        config = write_yaml(workdir / "config.yaml", tiny_config(workdir))
        return [
            str(BIN / "snakemake"),
            "-s",
            str(snakefile),
            "--directory",
            str(workdir),
            *WORKFLOW_TARGETS,
            "--configfile",
            str(config),
            *extra,
        ]

    slurm_cmd = command(slurm_dir, "--profile", str(PROFILE), *TEST_CLUSTER_ARGS)
    local_cmd = command(local_dir, "--cores", "2")
    # The SLURM run mostly waits for status polls: run the local one meanwhile.
    slurm_proc = subprocess.Popen(
        slurm_cmd, cwd=slurm_dir, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        local_env = {key: value for key, value in slurm_env.items() if not key.startswith("SLURM_")}
        local_rc, local_log = run_snakemake(local_cmd, local_dir, local_env)
        slurm_log, _ = slurm_proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if slurm_proc.poll() is None:
            slurm_proc.kill()
            slurm_proc.wait()
    (slurm_dir / "run.log").write_text(slurm_log)
    assert local_rc == 0, f"local run failed:\n{local_log[-5000:]}"
    assert slurm_proc.returncode == 0, f"SLURM run failed:\n{slurm_log[-5000:]}"
    assert "SLURM jobid" not in local_log

    submitted = assert_every_cluster_job_went_through_sbatch(slurm_log, slurm_env)
    rules = {rule for submissions in submitted.values() for _, rule in submissions}
    assert "crops" in rules, rules
    for submissions in submitted.values():
        # the last submission completed (an earlier one may have failed and been retried per the profile)
        info = scontrol_job(slurm_env, submissions[-1][0])
        assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info

    for store in COMPARED_STORES:
        local_data, local_attrs = h5_contents(local_dir / store)
        slurm_data, slurm_attrs = h5_contents(slurm_dir / store)
        assert local_data, f"{store}: no datasets"
        assert "crops" in local_data and local_data["crops"].shape[0] > 0
        assert local_data.keys() == slurm_data.keys(), f"{store}: dataset names differ"
        for name in local_data:
            assert local_data[name].dtype == slurm_data[name].dtype, f"{store}:{name} dtype differs"
            assert np.array_equal(local_data[name], slurm_data[name]), f"{store}:{name} differs"
        assert local_attrs.keys() == slurm_attrs.keys()
        for name in local_attrs:
            assert_same_attrs(local_attrs[name], slurm_attrs[name], f"{store}:{name}")
    for table in ("results/splits.tsv",):
        assert (local_dir / table).read_text() == (slurm_dir / table).read_text(), table


def test_cluster_script_stop_is_idempotent(tmp_path):
    """`stop` on a folder with no cluster stops nothing and does not fail (runs anywhere, no root)."""
    proc = subprocess.run(
        [sys.executable, str(CLUSTER_SCRIPT), "stop", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "stopped: nothing was running"
