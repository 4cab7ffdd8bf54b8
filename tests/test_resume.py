"""A run killed with SIGKILL mid-training and restarted resumes from its checkpoint, bit-identical."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.experiments import load_paper, resolve_cell
from common.results import repeatable_part

REPO = Path(__file__).resolve().parent.parent



def train_cmd(spec_path, out, ckpt):
    return [sys.executable, "-m", "common.train", str(spec_path), str(out), "--checkpoint", str(ckpt)]


@pytest.mark.parametrize("row", ["FedAvgM, E=40", "FedDF, E=40"])
def test_sigkill_and_restart_resumes_bit_identical(tmp_path, row):
    paper = load_paper("feddf")
    t = paper["tables"]["table1"]
    r = [x["label"] for x in t["rows"]].index(row)
    spec = resolve_cell(paper, "table1", r, 3, "smoke").specs[0]
    spec = {**spec, "training": {**spec["training"], "rounds": 8}}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    # Uninterrupted reference.
    ref = subprocess.run(train_cmd(spec_path, tmp_path / "ref.json", tmp_path / "ref.pt"), env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    assert not (tmp_path / "ref.pt").exists()  # the checkpoint is removed once the result is written

    out, ckpt = tmp_path / "run.json", tmp_path / "run.pt"
    proc = subprocess.Popen(train_cmd(spec_path, out, ckpt), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["next_round"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must leave no results file"
    killed_at = torch.load(ckpt, weights_only=False)["next_round"]
    assert 3 <= killed_at < 8, "the run should have been killed mid-training"

    again = subprocess.run(train_cmd(spec_path, out, ckpt), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    resumed = json.loads(out.read_text())
    assert resumed["resumed_at_rounds"] == [killed_at]
    assert repeatable_part(resumed) == repeatable_part(json.loads((tmp_path / "ref.json").read_text()))
