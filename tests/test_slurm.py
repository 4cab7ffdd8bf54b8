"""The cluster profile against a real Slurm: FedDF's smoke report built through profiles/slurm-cpu equals a local
build, a second run trains nothing, and a job cancelled with `scancel` or a training process killed with SIGKILL is
submitted again and resumes from its checkpoint, bit-identical.

Not part of `make test` (marker `slurm`, deselected by default; CI has no Slurm). On a Debian machine:

    sudo scripts/slurm-single-node install && sudo scripts/slurm-single-node start
    .venv/bin/pip install -e '.[cluster]'
    .venv/bin/pytest -m slurm tests/test_slurm.py -v -s
    sudo scripts/slurm-single-node stop

Jobs run as the user who runs the test, in a temporary folder that the Slurm node must see (a single-node Slurm
does)."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.experiments import paper_runs
from common.results import repeatable_part

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
PAPER = "feddf"



@pytest.fixture(scope="module", autouse=True)
def _slurm():
    """These tests run only when asked for (`-m slurm`): then a missing plugin or Slurm is a failure that says what
    to set up, not a silent skip."""
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        pytest.fail("the Slurm executor plugin is not installed: pip install -e '.[cluster]'")
    if not shutil.which("sbatch"):
        pytest.fail("no Slurm here: sudo scripts/slurm-single-node install && sudo scripts/slurm-single-node start")
    up = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%a %D"], capture_output=True, text=True)
    if up.returncode != 0 or not up.stdout.startswith("up"):
        pytest.fail(f"no Slurm partition 'cpu' is up ({(up.stderr or up.stdout).strip()}): "
                    "sudo scripts/slurm-single-node start")


def snakemake(workdir: Path, *args: str, profile: bool, popen: bool = False):
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           *(["--profile", str(REPO / "profiles" / "slurm-cpu")] if profile else ["--cores", "2"]),
           f"reports/{PAPER}.md", *args, "--config", "scale=smoke"]
    workdir.mkdir(parents=True, exist_ok=True)
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir)
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=workdir,
                          timeout=1800)


def results(workdir: Path) -> dict:
    return {rid: json.loads((workdir / "results" / "runs" / f"{rid}.json").read_text())
            for rid in paper_runs(PAPER, "smoke")}


def tables(workdir: Path) -> str:
    return (workdir / "reports" / f"{PAPER}.md").read_text().split("## Provenance")[0]


def submissions(log: str) -> int:
    """How many Slurm jobs a Snakemake log says it submitted."""
    return log.count("has been submitted with SLURM jobid")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """FedDF's smoke report built locally and through profiles/slurm-cpu, each from scratch."""
    root = tmp_path_factory.mktemp("slurm")
    times = {}
    for name, profile in (("local", False), ("slurm", True)):
        start = time.monotonic()
        proc = snakemake(root / name, profile=profile)
        times[name] = time.monotonic() - start
        assert proc.returncode == 0, proc.stdout[-4000:]
        if profile:
            slurm_log = proc.stdout
    print(f"\nsmoke build of reports/{PAPER}.md: local {times['local']:.0f} s, Slurm {times['slurm']:.0f} s")
    return root / "local", root / "slurm", slurm_log


def test_slurm_build_equals_the_local_build(builds):
    local, slurm, log = builds
    assert submissions(log) >= 1, log[-3000:]
    a, b = results(local), results(slurm)
    for rid in a:
        assert repeatable_part(a[rid]) == repeatable_part(b[rid]), rid
    assert tables(local) == tables(slurm)
    # every training job went to Slurm, grouped: fewer Slurm jobs than runs, none trained by the main process
    assert "Group job runs" in log and submissions(log) < len(a), log[-3000:]


def test_a_second_slurm_run_trains_nothing(builds):
    _, slurm, _ = builds
    proc = snakemake(slurm, profile=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert submissions(proc.stdout) == 0, proc.stdout[-3000:]


def interrupt_and_resume(builds, tmp_path, interrupt) -> None:
    """Delete every result of the Slurm build, start it again, and call `interrupt(workdir, run)` as soon as a run
    has written a checkpoint and is not yet finished; the build must end with the local build's results, a run
    resumed from its checkpoint."""
    local, slurm, _ = builds
    d = tmp_path / "w"
    shutil.copytree(slurm, d, ignore=shutil.ignore_patterns("slurm_logs"))
    shutil.rmtree(d / "results" / "runs")
    proc = snakemake(d, profile=True, popen=True)
    checkpoints, done = d / "results" / "checkpoints", d / "results" / "runs"
    deadline, hit = time.time() + 900, None
    while hit is None and time.time() < deadline and proc.poll() is None:
        for ckpt in sorted(checkpoints.glob("*.pt")) if checkpoints.is_dir() else []:
            if not (done / f"{ckpt.stem}.json").exists() and interrupt(d, ckpt.stem):
                hit = ckpt.stem
                break
        time.sleep(0.05)
    log, _ = proc.communicate(timeout=1800)
    assert hit is not None, "no run was interrupted after a checkpoint: " + log[-3000:]
    assert proc.returncode == 0, log[-4000:]
    assert "Trying to restart job" in log, log[-4000:]
    got, want = results(d), results(local)
    # The interrupted run, or (when it finished just before the interrupt) the next one of its group: Snakemake
    # deletes the outputs of every job of a failed group job, so runs that the group had finished start afresh.
    assert any(r["resumed_at_rounds"] for r in got.values()), f"no run resumed from a checkpoint (interrupted: {hit})"
    for rid in want:
        assert repeatable_part(got[rid]) == repeatable_part(want[rid]), rid
    assert tables(d) == tables(local)


def test_a_cancelled_job_is_submitted_again_and_resumes(builds, tmp_path):
    def scancel(workdir, run):
        jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %Z"], capture_output=True,
                              text=True).stdout.split("\n")
        ids = [line.split()[0] for line in jobs if line.strip() and Path(line.split(None, 1)[1]) == workdir]
        if ids:
            subprocess.run(["scancel", *ids], check=True)
        return bool(ids)
    interrupt_and_resume(builds, tmp_path, scancel)


def test_a_killed_training_process_is_submitted_again_and_resumes(builds, tmp_path):
    def kill(workdir, run):
        pids = subprocess.run(["pgrep", "-f", f"common.train results/specs/{run}.json"], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:  # the training process itself, not the shell that started it
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if argv[1:3] == [b"-m", b"common.train"] and Path(f"/proc/{pid}/cwd").resolve() == workdir.resolve():
                    os.kill(int(pid), signal.SIGKILL)
                    return True
            except (FileNotFoundError, ProcessLookupError):
                pass  # it has just finished
        return False
    interrupt_and_resume(builds, tmp_path, kill)
