"""Reliability and safety: corrupt or unreadable files, hard kills, file permissions, shell quoting, a full disk.

Every failure is real: files truncated or overwritten with garbage bytes, a Snakemake process group killed with
SIGKILL, a tiny tmpfs filled up (where this process may not mount one: a writer whose fsync fails with ENOSPC).
The workflow tests share one smoke-scale build of the CCVR report (5 runs, 4 calibrations), made with a data_root
and in a folder whose paths have a space, and each re-runs only the jobs its scenario needs."""
import copy
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from common.errors import SuiteError
from common.experiments import known_papers, paper_calibrations, paper_runs
from common.results import (read_result, read_spec, recover_results, repeatable_part, write_json_atomic,
                            write_text_atomic)

REPO = Path(__file__).resolve().parent.parent
PAPER = "ccvr"  # the smallest smoke report with calibrations
# `--forcerun report` as the default profile means it: rebuild the requested report, not every report.
TARGET = [f"reports/{PAPER}.md", "--forcerun", "report", "-p"]


def snakemake(workdir: Path, *args: str, config=(), popen=False, **kw):
    """The documented command (`snakemake reports/<paper>.md --config scale=smoke ...`) in `workdir`, umask 022."""
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *TARGET, *args, "--config", "scale=smoke", *config]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, umask=0o022, **kw)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, umask=0o022, **kw)


def output(proc) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def job_counts(text: str) -> dict[str, int]:
    stats = text.split("Job stats:")[1] if "Job stats:" in text else ""
    return {k: int(v) for k, v in re.findall(r"^(\w+)\s+(\d+)$", stats.split("\n\n")[0], flags=re.M)
            if k != "total"}



def run_of(method: str) -> str:
    return next(rid for rid, s in sorted(paper_runs(PAPER, "smoke").items()) if s["method"]["name"] == method)


CENTRAL = run_of("centralised")  # the cheapest run of the report; no calibration is based on it
CALIBRATION = sorted(paper_calibrations(PAPER, "smoke", None))[0]


class Build(NamedTuple):
    dir: Path
    config: list[str]  # the --config entries it was built with (the same ones retrain nothing)
    log: str


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    """The smoke-scale report built from scratch in a folder whose path has a space, with a data_root that has one
    (the observed `--config 'data_root=/tmp/my data'`): every training, calibration and report job receives it."""
    root = tmp_path_factory.mktemp("reliability")
    d, config = root / "smoke build", [f"data_root={root / 'my data'}"]
    proc = snakemake(d, config=config)
    assert proc.returncode == 0, output(proc)[-3000:]
    return Build(d, config, output(proc))


def copy_build(src: Path, dst: Path, metadata: bool = True) -> Path:
    """A copy of a build (file times kept); without `metadata`, Snakemake's records of past jobs are left out."""
    shutil.copytree(src, dst, symlinks=True, ignore=None if metadata else shutil.ignore_patterns(".snakemake"))
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 8)


# --- corrupt results, calibrations and specs ---------------------------------------------------------------------

def test_corrupt_results_are_moved_aside_and_retrained_with_one_warning_each(smoke_build, tmp_path):
    d = copy_build(smoke_build.dir, tmp_path / "w")
    run, cal = d / "results/runs" / f"{CENTRAL}.json", d / "results/calibrations" / f"{CALIBRATION}.json"
    spec = d / "results/specs" / f"{run_of('fedavg')}.json"
    truncate(run)  # the observed failure: a truncated results file
    record = json.loads(cal.read_text())
    del record["metrics"]  # valid JSON that fails validation
    cal.write_text(json.dumps(record))
    garbage(spec)
    proc = snakemake(d, config=smoke_build.config)
    out = output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out
    assert (f"warning: results/runs/{CENTRAL}.json is truncated: " in out
            and f"moved results/runs/{CENTRAL}.json to results/corrupt/runs/{CENTRAL}.json; its run is trained "
                "again" in out), out[-3000:]
    assert (f"warning: results/calibrations/{CALIBRATION}.json is not a valid results file (top level: 'metrics' "
            "is a required property); moved" in out)
    assert (f"warning: results/specs/{run_of('fedavg')}.json is not text (garbage bytes); rewrote it from the "
            "workflow's spec (nothing is retrained)" in out)
    # only what was corrupt is redone (and the report, always rebuilt)
    assert job_counts(out) == {"train": 1, "calibrate": 1, "report": 1}, job_counts(out)
    for name in (f"runs/{CENTRAL}.json", f"calibrations/{CALIBRATION}.json"):
        reference = read_result(smoke_build.dir / "results" / name)
        assert repeatable_part(read_result(d / "results" / name)) == repeatable_part(reference)
    assert read_spec(spec) == paper_runs(PAPER, "smoke")[run_of("fedavg")]
    assert (d / "results/corrupt/runs" / f"{CENTRAL}.json").is_file()


@pytest.mark.parametrize("damage,message", [
    (truncate, "is truncated: "),
    (garbage, "is not text (garbage bytes)"),
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "status": "done"})),
     "is not a valid results file: status: 'done' is not one of ['completed', 'diverged']"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "run_id": "0" * 12})),
     "is not a valid results file: run_id 000000000000 is not the hash of its spec"),
])
def test_reading_a_corrupt_results_file_is_one_actionable_message(smoke_build, tmp_path, damage, message):
    path = tmp_path / f"{CENTRAL}.json"
    shutil.copy(smoke_build.dir / "results/runs" / path.name, path)
    damage(path)
    with pytest.raises(SuiteError) as e:
        read_result(path)
    text = str(e.value)
    assert text.startswith(f"results file {path} {message}"), text
    assert "Delete it and run the same snakemake command again" in text and "\n" not in text


def test_recovery_moves_a_truncated_model_aside_with_its_run(smoke_build, tmp_path):
    """A truncated final model (the input of calibrations) cannot be read: model and results go, so both are
    trained again; a run whose results are valid stays; recovery is idempotent."""
    d = copy_build(smoke_build.dir / "results", tmp_path / "results")
    base = run_of("fedavg")
    truncate(d / "models" / f"{base}.pt")
    lines = recover_results(d)
    assert lines == [f"warning: {d}/models/{base}.pt is unreadable (truncated or not a torch file: File is not "
                     f"a zip file); moved {d}/models/{base}.pt to {d}/corrupt/models/{base}.pt and {d}/runs/{base}.json to "
                     f"{d}/corrupt/runs/{base}.json; its run is trained again"], lines
    assert not (d / "runs" / f"{base}.json").exists() and (d / "runs" / f"{CENTRAL}.json").exists()
    assert recover_results(d) == []


def test_a_corrupt_spec_or_model_is_one_message_from_the_entry_points(smoke_build, tmp_path, capsys):
    from common import calibrate, train
    spec = tmp_path / f"{CENTRAL}.json"
    shutil.copy(smoke_build.dir / "results/specs" / spec.name, spec)
    truncate(spec)
    assert train.main([str(spec), str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: spec file {spec} is truncated: ") and err.count("\n") == 1, err
    assert "It is written by the workflow: delete it and run the same snakemake command again" in err
    model = tmp_path / "model.pt"
    base = run_of("fedavg")
    shutil.copy(smoke_build.dir / "results/models" / f"{base}.pt", model)
    truncate(model)
    with pytest.raises(SuiteError, match=rf"model file {model} is unreadable \(.*\)\. Delete it and "
                                         rf"results/runs/{base}.json, then run the same snakemake command again"):
        calibrate.load_model_file(model, base)


# --- checkpoints ---------------------------------------------------------------------------------------------------

def tiny_run(method=None, seed=0, rounds=3):
    """A federated run on in-memory data (the engine's own loop), fast enough to train many times."""
    from torch import nn
    from common.data import Dataset, Split
    from common.fl import FederatedRun, RunContext, get_algorithm
    from common.models import Classifier

    def model():
        return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.ReLU()), 8, 3)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(240, 1, 4, 4, generator=g)
    y = x.flatten(1)[:, :3].argmax(1)
    method = method or {"name": "fedavgm", "beta": 0.5}
    spec = {"method": method, "seed": seed, "training": {"rounds": rounds, "client_fraction": 0.5,
                                                         "local_epochs": 2, "batch_size": 16, "lr": 0.1}}
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    ctx = RunContext(spec=spec, data=Dataset("tiny", Split(x[:180], y[:180]), Split(x[180:], y[180:]), 3),
                     parts=list(torch.arange(180).chunk(6)), model=model(), make_model=model,
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(method))


def keep_checkpoint_of_round(run, n: int, where: Path):
    """Copy the checkpoint `run` writes after round `n` to `where` (what a run killed after that round leaves)."""
    save = run.save_checkpoint

    def saving(path, next_round, *args):
        save(path, next_round, *args)
        if next_round == n:
            shutil.copy(path, where)
    run.save_checkpoint = saving


def history(h) -> dict:
    return {**{k: v for k, v in vars(h).items() if k not in ("resumed_at", "extra")},
            "extra": {k: v for k, v in h.extra.items() if k not in ("round_seconds", "train_seconds")}}


def same_run(a, ha, b, hb) -> bool:
    return history(ha) == history(hb) and all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)


def other_torch(path):
    ck = torch.load(path, weights_only=True)
    torch.save({**ck, "torch": "1.13.1"}, path)


def other_spec(path):
    ck = torch.load(path, weights_only=True)
    torch.save({**ck, "run": {**ck["run"], "seed": 1}}, path)


def no_format(path):
    ck = torch.load(path, weights_only=True)
    del ck["format"]
    torch.save(ck, path)


def pickled_objects(path):
    """A checkpoint of the suite's previous format: the History object and the torch optimiser pickled whole."""
    from common.fl.engine import History
    ck = torch.load(path, weights_only=True)
    run = tiny_run()
    run.algo.setup(run.ctx)
    state = {k: v for k, v in vars(run.algo).items() if k not in run.algo.transient}  # server_opt included
    torch.save({**ck, "history": History(**ck["history"]), "algorithm": state}, path)


@pytest.mark.parametrize("damage,reason", [
    (truncate, "is unreadable ("),
    (garbage, "is unreadable ("),
    (other_spec, "belongs to another run spec"),
    (other_torch, f"was written by torch 1.13.1, this is torch {torch.__version__}"),
    (no_format, "is in another checkpoint format"),
    (pickled_objects, "holds objects other than tensors and plain data"),
])
def test_a_corrupt_or_incompatible_checkpoint_restarts_from_round_0_bit_identical(tmp_path, capsys, damage, reason):
    ref = tiny_run()
    h_ref = ref.train(progress=False)
    ckpt = tmp_path / "run.pt"
    first = tiny_run()
    keep_checkpoint_of_round(first, 2, ckpt)
    first.train(progress=False, checkpoint=tmp_path / "first.pt")
    damage(ckpt)
    run = tiny_run()
    h = run.train(progress=False, checkpoint=ckpt)
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpt} {reason}" in err, err
    assert "ignoring it: the run starts again from round 0" in err and err.count("\n") == 1
    assert h.resumed_at == [] and same_run(run, h, ref, h_ref)


def test_the_run_entry_point_survives_a_truncated_checkpoint(smoke_build, tmp_path, capsys):
    """The observed failure: a truncated results/checkpoints/<id>.pt made every retry fail."""
    from common import train
    ckpt, out = tmp_path / f"{CENTRAL}.pt", tmp_path / f"{CENTRAL}.json"
    spec = smoke_build.dir / "results/specs" / f"{CENTRAL}.json"
    ckpt.write_bytes(b"PK\x03\x04" + bytes(100))  # a zip archive's start, cut off
    assert train.main([str(spec), str(out), "--checkpoint", str(ckpt)]) == 0
    err = capsys.readouterr().err
    assert f"warning: checkpoint {ckpt} is unreadable (" in err, err
    reference = read_result(smoke_build.dir / "results/runs" / out.name)
    assert repeatable_part(read_result(out)) == repeatable_part(reference)
    assert not ckpt.exists()


def registered_algorithms() -> list[str]:
    from common.fl.algorithms import ALGORITHMS, _import_paper_methods
    _import_paper_methods()  # the papers' methods register themselves
    return sorted(ALGORITHMS)


def smoke_spec(method: str) -> dict:
    """The first smoke-scale spec of any paper that uses `method`, shrunk to 2 rounds of (at most) 3 clients that
    all train every round (so per-client state such as control variates or kept models is in the checkpoint), on
    300 training samples."""
    spec = next((s for paper in known_papers() for _, s in sorted(paper_runs(paper, "smoke").items())
                 if s["method"]["name"] == method), None)
    assert spec is not None, f"no paper runs algorithm '{method}' at smoke scale: add a spec here to test it"
    spec = copy.deepcopy(spec)
    spec["training"].update(rounds=2, client_fraction=1.0, local_epochs=1)
    if "teacher_rounds" in spec["method"]:  # KD fidelity, KD-SVD: teachers in round 1, the student in round 2
        spec["method"]["teacher_rounds"] = 1
        spec["method"].pop("init_rounds", None)  # FSP's warm-up stage: its own resume test is in test_resume.py
    spec["dataset"].update(train_limit=300, test_limit=100)
    # a domain partition, or a model with one part per client (FeSTA's heads and tails), keeps its clients
    if spec["partition"]["scheme"] != "domain" and "clients" not in spec["model"]:
        spec["partition"]["clients"] = min(spec["partition"]["clients"], 3)
    return spec


@pytest.mark.parametrize("method", registered_algorithms())
def test_every_algorithm_resumes_bit_identical_from_a_weights_only_checkpoint(tmp_path, capsys, method):
    from common.fl import FederatedRun, RunContext, get_algorithm
    from common.train import load_data_and_partition, make_deterministic, model_factory
    spec = smoke_spec(method)

    def make_run():
        dev = torch.device("cpu")
        make_deterministic(dev, 1)
        data, parts = load_data_and_partition(spec, "data")
        make_model = model_factory(spec, data, dev)
        torch.manual_seed(spec["seed"])
        ctx = RunContext(spec=spec, data=data, parts=parts, model=make_model(), make_model=make_model, device=dev,
                         data_root="data")
        return FederatedRun(ctx, get_algorithm(spec["method"]))

    ckpt = tmp_path / "after_round_1.pt"
    ref = make_run()
    keep_checkpoint_of_round(ref, 1, ckpt)
    h_ref = ref.train(progress=False, checkpoint=tmp_path / "ref.pt")
    ck = torch.load(ckpt, weights_only=True)  # plain tensors, lists and dicts only
    assert isinstance(ck["history"], dict) and ck["next_round"] == 1
    run = make_run()
    h = run.train(progress=False, checkpoint=ckpt)
    assert "warning" not in capsys.readouterr().err
    assert h.resumed_at == [1] and same_run(run, h, ref, h_ref)


# --- a hard kill ---------------------------------------------------------------------------------------------------

def test_after_sigkill_of_snakemake_the_same_command_continues_without_unlock(smoke_build, tmp_path):
    d = copy_build(smoke_build.dir, tmp_path / "w")
    (d / "results/runs" / f"{CENTRAL}.json").unlink()  # one run to train
    proc = snakemake(d, config=smoke_build.config, popen=True, start_new_session=True)
    locks, started = d / ".snakemake/locks", d / ".snakemake/incomplete"
    deadline = time.time() + 300
    while time.time() < deadline and not (list(locks.glob("*.lock")) and started.is_dir() and
                                          any(started.iterdir())):  # locked, and the training job started
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.02)
    # while it runs, it holds the lock that tells a second Snakemake process to leave its locks alone
    fd = os.open(d / ".snakemake/suite.flock", os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
    assert proc.poll() is None, "the run should still be training when it is killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert list(locks.glob("*.lock")), "a killed Snakemake leaves its locks behind"
    again = snakemake(d, config=smoke_build.config)
    out = output(again)
    assert again.returncode == 0, out[-3000:]
    assert "Directory cannot be locked" not in out
    assert ("warning: removed the stale Snakemake lock left in " in out
            and "by a killed or crashed run (no other Snakemake process runs in this directory)" in out), out[-3000:]
    assert not list(locks.glob("*.lock"))
    name = f"runs/{CENTRAL}.json"
    reference = read_result(smoke_build.dir / "results" / name)
    assert repeatable_part(read_result(d / "results" / name)) == repeatable_part(reference)
    assert (d / "reports" / f"{PAPER}.md").is_file()


# --- permissions ---------------------------------------------------------------------------------------------------

def test_results_calibrations_and_reports_are_group_readable(smoke_build):
    d = smoke_build.dir
    files = [*(d / "results/runs").glob("*.json"), *(d / "results/calibrations").glob("*.json"),
             *(d / "results/specs").glob("*.json"), *(d / "results/models").glob("*.pt"),
             *(d / "reports").glob(f"{PAPER}.*"), *(d / "reports/figures").glob(f"{PAPER}_*")]
    assert len(files) > 15
    modes = {str(f.relative_to(d)): oct(f.stat().st_mode & 0o777) for f in files}
    assert set(modes.values()) == {"0o644"}, modes  # what the umask 022 of the workflow's caller allows


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == "0o640"


# --- shell quoting -------------------------------------------------------------------------------------------------

def test_a_data_root_with_spaces_reaches_every_job(smoke_build):
    data_root = smoke_build.config[0].split("=", 1)[1]
    assert " " in data_root and " " in str(smoke_build.dir)
    for module in ("common.train", "common.calibrate", "common.report.build"):  # -p prints the commands
        assert re.search(rf"-m {module} .*--data-root {re.escape(shlex.quote(data_root))}", smoke_build.log), module
    assert (smoke_build.dir / "reports" / f"{PAPER}.md").is_file()


def test_a_data_root_with_shell_characters_reaches_the_jobs_verbatim(smoke_build, tmp_path):
    data_root = "data;touch INJECTED;$(touch INJECTED2)`touch INJECTED3`'\"q"
    d = copy_build(smoke_build.dir, tmp_path / "w", metadata=False)  # no records of the old data_root
    (d / "results/runs" / f"{CENTRAL}.json").unlink()  # a training job receives data_root, as does the report
    (d / "reports" / f"{PAPER}.md").unlink()
    proc = snakemake(d, config=[f"data_root={data_root}"])
    out = output(proc)
    assert proc.returncode == 0, out[-3000:]
    assert job_counts(out) == {"train": 1, "report": 1}, job_counts(out)
    for module in ("common.train", "common.report.build"):  # quoted in both commands
        assert re.search(rf"-m {module} .*--data-root {re.escape(shlex.quote(data_root))}", out), out[-3000:]
    assert not [p.name for p in d.rglob("INJECTED*")] and not list(REPO.glob("INJECTED*"))
    assert (d / "reports" / f"{PAPER}.md").is_file()


# --- a full disk ---------------------------------------------------------------------------------------------------

@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """A folder on a 64 KiB tmpfs filled to the last byte (root only), else a folder whose file writes fail with
    ENOSPC when flushed to disk (`os.fsync` patched)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                             capture_output=True).returncode == 0

    def fill():
        if mounted:
            with open(mnt / "filler", "wb", buffering=0) as f:
                with pytest.raises(OSError) as e:
                    while True:
                        f.write(bytes(4096))
                assert e.value.errno == errno.ENOSPC
        else:
            real = os.fsync

            def fsync(fd):
                if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(mnt)):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real(fd)
            monkeypatch.setattr(os, "fsync", fsync)
    yield mnt, fill
    if mounted:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_full_disk_keeps_the_previous_file_and_says_so(full_disk):
    mnt, fill = full_disk
    path = mnt / "result.json"
    write_json_atomic(path, {"old": True})
    fill()
    with pytest.raises(SuiteError) as e:
        write_json_atomic(path, {"new": "x" * 100_000})
    assert str(e.value) == (f"could not write {path}: No space left on device; the previous {path} is left "
                            f"unchanged. Free disk space (or fix the permissions) and run the same command again")
    assert isinstance(e.value, OSError)
    assert json.loads(path.read_text()) == {"old": True}
    assert not list(mnt.glob(".*.tmp"))  # nor a temporary file left behind


def test_a_run_on_a_full_disk_keeps_its_previous_result_and_says_so(smoke_build, full_disk, capsys):
    from common import train
    mnt, fill = full_disk
    spec = smoke_build.dir / "results/specs" / f"{CENTRAL}.json"
    out, ckpt = mnt / f"{CENTRAL}.json", mnt / f"{CENTRAL}.pt"
    shutil.copy(smoke_build.dir / "results/runs" / out.name, out)
    before = out.read_bytes()
    fill()
    assert train.main([str(spec), str(out), "--checkpoint", str(ckpt)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    warned = [line for line in lines if line.startswith(f"warning: could not write checkpoint {ckpt} after round ")]
    if mnt.joinpath("filler").exists():  # a real full disk (a patched fsync does not touch torch's writes)
        assert len(warned) == 3 and all(w.endswith("the previous checkpoint is left as it was and training goes on")
                                        for w in warned), lines
    err = [line for line in lines if line not in warned]
    assert err == [f"error: could not write {out}: No space left on device; the previous {out} is left unchanged. "
                   f"Free disk space (or fix the permissions) and run the same command again"], err
    assert out.read_bytes() == before
