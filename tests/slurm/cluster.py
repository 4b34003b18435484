#!/usr/bin/env python3
"""Start and stop a real single-node SLURM cluster for tests (munge + slurmctld + slurmd).

Why: the SLURM profile (profiles/slurm) is only proven by submitting the workflow to a real
SLURM, not a mock. This script builds one on the local machine in a few seconds, with every
file (config, keys, sockets, state, logs, pid files) under one state directory, so it never
touches a site's /etc/slurm and several clusters can coexist (free ports are picked at start).

    python3 tests/slurm/cluster.py start  STATE_DIR   # install (root, apt) if missing; start; wait idle
    python3 tests/slurm/cluster.py stop   STATE_DIR   # cancel jobs, stop the daemons by their pid files
    python3 tests/slurm/cluster.py status STATE_DIR   # exit 0 when the node answers idle/mixed/allocated
    eval "$(python3 tests/slurm/cluster.py env STATE_DIR)"  # use sbatch/squeue/snakemake against it

The node is named after `slurmd -C` (the host's short name) with the topology that command
reports, one partition `debug` (default), and one fake GPU (a character device made with mknod),
so `sbatch --gpus=1` is scheduled and the job sees CUDA_VISIBLE_DEVICES=0. No accounting
daemon: use `squeue` as the status command (profiles/slurm does).

Clients find the config through SLURM_CONF. The jobstep plugin deletes every SLURM_* variable
before its inner `srun`, so STATE_DIR/bin holds wrappers of the SLURM commands that re-export
SLURM_CONF; put STATE_DIR/bin first on PATH (the `env` command prints both).
Standard library only, so it runs under any python3 >= 3.9.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

APT_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmd", "slurmctld", "munged")  # stop order
CLIENT_TOOLS = (
    "sbatch",
    "srun",
    "salloc",
    "squeue",
    "scontrol",
    "sinfo",
    "scancel",
    "sacct",
    "sacctmgr",
    "sstat",
    "sshare",
)
PARTITION = "debug"
CLUSTER_NAME = "lunatest"
MAX_SOCKET_PATH_CHARS = 100  # sun_path holds 108 bytes
READY_STATES = ("idle", "mixed", "allocated", "completing")


class ClusterError(RuntimeError):
    """The cluster could not be installed, started or stopped; the message says which step."""


# --------------------------------------------------------------------------------------------
# layout


class Layout:
    """Paths of one cluster's files under its state directory."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir).resolve()
        self.conf = self.root / "slurm.conf"
        self.gres_conf = self.root / "gres.conf"  # slurmd reads it next to slurm.conf
        self.bin = self.root / "bin"
        self.log = self.root / "log"
        self.run = self.root / "run"
        self.ctld_state = self.root / "ctld"
        self.spool = self.root / "spool"
        self.dev = self.root / "dev"
        self.gpu_device = self.dev / "nvidia0"
        self.munge = self.root / "munge"
        self.munge_key = self.munge / "munge.key"
        self.munge_socket = self.munge / "munge.socket.2"
        self.munge_seed = self.munge / "munged.seed"

    def pid_file(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self.log / f"{daemon}.log"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment in which SLURM clients (and jobs' inner srun) talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        path = [p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != str(self.bin)]
        env["PATH"] = os.pathsep.join([str(self.bin), *path])
        return env


# --------------------------------------------------------------------------------------------
# install


def _missing_tools() -> list[str]:
    needed = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "srun")
    return [tool for tool in needed if _which(tool) is None]


WRAPPER_MARK = "# luna test-cluster wrapper"


def _which(tool: str) -> str | None:
    """Path of a system tool, also where /usr/sbin is not on PATH (non-login root shells); never one of
    our own client wrappers (another cluster's bin/ may be on PATH)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + "/usr/sbin:/usr/bin:/sbin:/bin"
    for folder in path.split(os.pathsep):
        found = shutil.which(tool, path=folder) if folder else None
        if found is None:
            continue
        try:
            with open(found, "rb") as handle:
                head = handle.read(256)
        except OSError:
            continue
        if WRAPPER_MARK.encode() not in head:
            return found
    return None


def ensure_installed(quiet: bool = True) -> None:
    """Install Debian's slurm-wlm and munge with apt-get when a daemon or client is missing.

    Only as root (CI machines are bare and run as root); otherwise a clear error.
    """
    missing = _missing_tools()
    if not missing:
        return
    if os.geteuid() != 0:
        raise ClusterError(
            f"SLURM tools missing ({', '.join(missing)}) and not root: "
            f"install {' '.join(APT_PACKAGES)} or run as root"
        )
    if _which("apt-get") is None:
        raise ClusterError(f"SLURM tools missing ({', '.join(missing)}) and no apt-get to install them")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    out = subprocess.DEVNULL if quiet else None
    steps = (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
    )
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise ClusterError(f"{shlex.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    still = _missing_tools()
    if still:
        raise ClusterError(f"after apt-get install {' '.join(APT_PACKAGES)} still missing: {', '.join(still)}")


# --------------------------------------------------------------------------------------------
# configuration


def node_topology() -> tuple[str, str]:
    """(node name, topology fields) from `slurmd -C`, e.g. ('vm', 'CPUs=2 Boards=1 ... RealMemory=24105').

    Copying the whole line matters: `CPUs=2` alone is read as two sockets (pitfall 3).
    """
    slurmd = _which("slurmd")
    assert slurmd is not None
    proc = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    first = proc.stdout.splitlines()[0] if proc.stdout.strip() else ""
    fields = dict(token.split("=", 1) for token in first.split() if "=" in token)
    if proc.returncode != 0 or "NodeName" not in fields or "CPUs" not in fields:
        raise ClusterError(f"`slurmd -C` gave no node line (exit {proc.returncode}): {proc.stdout}{proc.stderr}")
    name = fields.pop("NodeName")
    fields.pop("UpTime", None)
    return name, " ".join(f"{key}={value}" for key, value in fields.items())


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports free on every address right now (the daemons bind 0.0.0.0)."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("0.0.0.0", 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def slurm_conf_text(layout: Layout, node: str, topology: str, ctld_port: int, slurmd_port: int) -> str:
    """slurm.conf of a one-node cluster without accounting, everything under the state dir."""
    r = layout
    return f"""\
# Written by tests/slurm/cluster.py: a throw-away single-node test cluster.
ClusterName={CLUSTER_NAME}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r.munge_socket}
StateSaveLocation={r.ctld_state}
SlurmdSpoolDir={r.spool}
SlurmctldPidFile={r.pid_file("slurmctld")}
SlurmdPidFile={r.pid_file("slurmd")}
SlurmctldLogFile={r.log_file("slurmctld")}
SlurmdLogFile={r.log_file("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
ReturnToService=2
# squeue must still list finished jobs when the status poll comes (plugin needs >= 3x its interval)
MinJobAge=600
KillWait=5
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/none
GresTypes=gpu
NodeName={node} NodeAddr=127.0.0.1 {topology} Gres=gpu:1 State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def make_gpu_device(path: Path) -> Path:
    """A character device standing for the GPU (slurmd rejects a regular file); /dev/null if mknod is denied."""
    if path.exists() or path.is_symlink():
        path.unlink()
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        return path
    except OSError:
        return Path("/dev/null")


def write_wrappers(layout: Layout) -> None:
    """STATE/bin/<tool>: re-export SLURM_CONF, then run the real tool (the jobstep plugin drops SLURM_*)."""
    layout.bin.mkdir(parents=True, exist_ok=True)
    for tool in CLIENT_TOOLS:
        real = _which(tool)
        if real is None:
            continue
        wrapper = layout.bin / tool
        lines = ["#!/bin/sh", WRAPPER_MARK, f"export SLURM_CONF={shlex.quote(str(layout.conf))}"]
        wrapper.write_text("\n".join([*lines, f'exec {shlex.quote(real)} "$@"', ""]))
        wrapper.chmod(0o755)


def write_config(layout: Layout) -> None:
    """Fresh state, munge key, fake GPU, slurm.conf, gres.conf and client wrappers."""
    if len(str(layout.munge_socket)) > MAX_SOCKET_PATH_CHARS:
        raise ClusterError(f"state dir path too long for a unix socket: {layout.munge_socket}")
    for stale in (layout.ctld_state, layout.spool, layout.run):
        shutil.rmtree(stale, ignore_errors=True)
    for folder in (layout.root, layout.log, layout.run, layout.ctld_state, layout.spool, layout.dev, layout.munge):
        folder.mkdir(parents=True, exist_ok=True)
    layout.munge.chmod(0o711)  # clients must reach the socket; the key stays 0400
    if not layout.munge_key.exists():
        layout.munge_key.write_bytes(os.urandom(1024))
    layout.munge_key.chmod(0o400)
    node, topology = node_topology()
    ctld_port, slurmd_port = free_ports(2)
    layout.conf.write_text(slurm_conf_text(layout, node, topology, ctld_port, slurmd_port))
    gpu = make_gpu_device(layout.gpu_device)
    layout.gres_conf.write_text(f"NodeName={node} Name=gpu File={gpu}\n")
    write_wrappers(layout)


# --------------------------------------------------------------------------------------------
# processes


def _read_pid(layout: Layout, daemon: str) -> int | None:
    try:
        return int(layout.pid_file(daemon).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_ours(pid: int, layout: Layout) -> bool:
    """The pid is alive and its command line names this state dir (so a recycled pid is never killed)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return f"{layout.root}{os.sep}" in cmdline  # every daemon is given a path under it


def running_daemons(layout: Layout) -> dict[str, int]:
    """daemon -> pid, for this cluster's daemons that are alive."""
    found = {}
    for daemon in DAEMONS:
        pid = _read_pid(layout, daemon)
        if pid is not None and _is_ours(pid, layout):
            found[daemon] = pid
    return found


def _run_client(layout: Layout, args: list[str], timeout_s: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=layout.env(), capture_output=True, text=True, timeout=timeout_s)


def node_state(layout: Layout) -> str:
    """The node's state as sinfo prints it ('idle', 'down*', ...), '' when the controller does not answer."""
    try:
        proc = _run_client(layout, ["sinfo", "--noheader", "--Node", "--format=%T"], timeout_s=10)
    except subprocess.TimeoutExpired:
        return ""
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else ""


def _log_tails(layout: Layout, lines: int = 15) -> str:
    parts = []
    for daemon in reversed(DAEMONS):
        log = layout.log_file(daemon)
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log} ---\n" + "\n".join(tail))
    return "\n".join(parts)


def _wait(predicate, timeout_s: float, what: str, layout: Layout) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{_log_tails(layout)}")


def _start_daemon(layout: Layout, daemon: str, cmd: list[str]) -> None:
    proc = subprocess.run(cmd, env=layout.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ClusterError(
            f"{daemon} failed to start (exit {proc.returncode}): {proc.stderr.strip()}\n{_log_tails(layout)}"
        )
    _wait(lambda: daemon in running_daemons(layout), 20, f"{daemon}'s pid file", layout)


def start(state_dir: str | os.PathLike[str], timeout_s: float = 60, install: bool = True) -> Layout:
    """Start (or find running) the cluster under state_dir and wait until its node is ready."""
    layout = Layout(state_dir)
    if install:
        ensure_installed()
    if set(running_daemons(layout)) == set(DAEMONS) and node_state(layout) in READY_STATES:
        return layout
    stop(layout.root)  # leftovers of a half-started cluster
    write_config(layout)
    munged, slurmctld, slurmd = (_which(name) for name in ("munged", "slurmctld", "slurmd"))
    _start_daemon(
        layout,
        "munged",
        [
            str(munged),
            "--force",
            f"--socket={layout.munge_socket}",
            f"--key-file={layout.munge_key}",
            f"--pid-file={layout.pid_file('munged')}",
            f"--log-file={layout.log_file('munged')}",
            f"--seed-file={layout.munge_seed}",
        ],
    )
    _wait(layout.munge_socket.exists, 20, "the munge socket", layout)
    _start_daemon(layout, "slurmctld", [str(slurmctld), "-i", "-f", str(layout.conf)])
    _start_daemon(layout, "slurmd", [str(slurmd), "-f", str(layout.conf)])
    _wait(lambda: _ready_or_dead(layout), timeout_s, "the node to be idle", layout)
    dead = set(DAEMONS) - set(running_daemons(layout))
    if dead:
        raise ClusterError(f"{', '.join(sorted(dead))} exited during start\n{_log_tails(layout)}")
    return layout


def _ready_or_dead(layout: Layout) -> bool:
    """True once the node is ready, or as soon as a daemon has died (no use waiting then)."""
    return set(running_daemons(layout)) != set(DAEMONS) or node_state(layout) in READY_STATES


def _cancel_jobs(layout: Layout) -> None:
    """Cancel this cluster's jobs and give them a moment to end (their slurmstepd are not ours to kill)."""
    try:
        listed = _run_client(layout, ["squeue", "--noheader", "--format=%i", "--states=PD,R,CG,S"])
        ids = listed.stdout.split() if listed.returncode == 0 else []
        if ids:
            _run_client(layout, ["scancel", *ids])
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                left = _run_client(layout, ["squeue", "--noheader", "--format=%i", "--states=PD,R,CG,S"])
                if left.returncode != 0 or not left.stdout.strip():
                    break
                time.sleep(0.5)
    except (subprocess.TimeoutExpired, OSError):
        pass


def stop(state_dir: str | os.PathLike[str], timeout_s: float = 20) -> list[str]:
    """Stop this cluster's daemons by their pid files (TERM, then KILL); returns the names stopped."""
    layout = Layout(state_dir)
    alive = running_daemons(layout)
    if {"slurmctld", "slurmd"} <= set(alive):
        _cancel_jobs(layout)
    stopped = []
    for daemon in DAEMONS:
        pid = alive.get(daemon)
        if pid is None:
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_ours(pid, layout) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_ours(pid, layout):
            os.kill(pid, signal.SIGKILL)
        stopped.append(daemon)
        layout.pid_file(daemon).unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------------------------
# command line


class ClusterApp:
    """`cluster.py start|stop|status|env STATE_DIR`."""

    def __init__(self, argv: list[str] | None = None) -> None:
        parser = argparse.ArgumentParser(
            description="A real single-node SLURM test cluster, all files under STATE_DIR.",
        )
        parser.add_argument(
            "command",
            choices=("start", "stop", "status", "env"),
            help="start: install if missing (root) and start, wait until idle; stop: cancel jobs and "
            "stop the daemons by pid file; status: print the node state, exit 0 when ready; "
            "env: print shell exports for SLURM_CONF and PATH",
        )
        parser.add_argument("state_dir", help="folder for config, keys, sockets, state, logs, pid files")
        parser.add_argument(
            "--timeout", type=float, default=60.0, help="seconds to wait for the node to be idle (default: 60)"
        )
        parser.add_argument(
            "--no-install", action="store_true", help="never run apt-get; fail when tools are missing (default: off)"
        )
        self.args = parser.parse_args(argv)

    def main(self) -> int:
        args = self.args
        try:
            if args.command == "start":
                t0 = time.monotonic()
                layout = start(args.state_dir, timeout_s=args.timeout, install=not args.no_install)
                print(f"SLURM test cluster up in {time.monotonic() - t0:.1f} s: SLURM_CONF={layout.conf}")
                print(f"node state: {node_state(layout)}; daemons: {running_daemons(layout)}")
            elif args.command == "stop":
                stopped = stop(args.state_dir)
                print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")
            elif args.command == "status":
                layout = Layout(args.state_dir)
                state = node_state(layout) if "slurmctld" in running_daemons(layout) else ""
                print(state or "down")
                return 0 if state in READY_STATES else 1
            else:
                layout = Layout(args.state_dir)
                print(f"export SLURM_CONF={shlex.quote(str(layout.conf))}")
                print(f'export PATH={shlex.quote(str(layout.bin))}:"$PATH"')
        except ClusterError as err:
            print(f"cluster.py {args.command}: {err}", file=sys.stderr)
            return 2
        return 0


def main() -> None:
    sys.exit(ClusterApp().main())


if __name__ == "__main__":
    main()
