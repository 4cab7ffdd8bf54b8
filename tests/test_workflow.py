"""End to end: `snakemake reports/feddf.md` at smoke scale, its reproducibility, and clear workflow errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.experiments import load_paper, paper_runs

REPO = Path(__file__).resolve().parent.parent
# What legitimately differs between two identical runs: clocks.
VOLATILE = {"started", "wall_time_s", "round_seconds", "provenance"}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200)


def strip(obj):
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE}
    return obj


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    dirs = [tmp_path_factory.mktemp(f"smoke{i}") for i in range(2)]
    for d in dirs:
        proc = snakemake(d, "reports/feddf.md", "--config", "scale=smoke")
        assert proc.returncode == 0, proc.stderr[-3000:]
    return dirs


@pytest.mark.slow
def test_smoke_report_is_built_from_every_run(smoke_runs):
    d = smoke_runs[0]
    runs = paper_runs("feddf", "smoke")
    assert sorted(p.stem for p in (d / "results" / "runs").glob("*.json")) == sorted(runs)
    report = (d / "reports" / "feddf.md").read_text()
    paper = load_paper("feddf")
    for table in paper["tables"].values():
        assert table["title"] in report
    claims = report.split("## Claims")[1].split("## ")[0]
    for claim in paper["claims"]:
        line = next(l for l in claims.splitlines() if l.startswith(f"| {claim['text']}"))
        assert re.match(r"\s*(✅|❌|➖) ", line.split("|")[-2]), line
    assert (d / "reports" / "figures" / "feddf_accuracy_per_round.png").stat().st_size > 10_000
    for rid in runs:
        assert (d / "results" / "benchmarks" / f"{rid}.tsv").is_file()
        res = json.loads((d / "results" / "runs" / f"{rid}.json").read_text())
        assert res["spec"] == runs[rid] and res["data"]["test_samples_in_train"] == 0
        assert len(res["metrics"]["test_accuracy"]) == runs[rid]["training"]["rounds"]


@pytest.mark.slow
def test_smoke_results_are_bit_identical_across_two_builds(smoke_runs):
    a, b = (sorted((d / "results" / "runs").glob("*.json")) for d in smoke_runs)
    assert [p.name for p in a] == [p.name for p in b]
    for pa, pb in zip(a, b):
        assert strip(json.loads(pa.read_text())) == strip(json.loads(pb.read_text())), pa.name
    tables = [(d / "reports" / "feddf.md").read_text().split("## Provenance")[0] for d in smoke_runs]
    assert tables[0] == tables[1]


@pytest.mark.slow
def test_up_to_date_workflow_reruns_nothing(smoke_runs):
    proc = snakemake(smoke_runs[0], "-n", "reports/feddf.md", "--config", "scale=smoke")
    assert proc.returncode == 0 and "Nothing to be done" in proc.stdout + proc.stderr


def test_unknown_paper_is_one_clear_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/nope.md")
    assert proc.returncode != 0
    assert "unknown paper 'nope'; known papers: feddf" in proc.stdout + proc.stderr


def test_unknown_scale_is_one_clear_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/feddf.md", "--config", "scale=huge")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "'huge' is not one of ['smoke', 'mini', 'paper']" in out


def test_missing_paper_scale_data_is_one_clear_error(tmp_path):
    proc = snakemake(tmp_path, "-n", "reports/feddf.md", "--config", "scale=paper", f"data_root={tmp_path / 'none'}")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "paper scale needs dataset files that are not in data_root" in out
    assert "cifar-10-batches-py/data_batch_1" in out and "cifar-100-python/train" in out
    assert not (tmp_path / "results").exists()
