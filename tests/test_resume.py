"""A run killed with SIGKILL mid-training and restarted resumes from its checkpoint, bit-identical. FedAvgM's and
FedDF's run by default; each paper's own methods are marked `kill` (`pytest -m kill tests/test_resume.py`), their
checkpoints' completeness being tested in-process for every algorithm by default (tests/test_reliability.py)."""
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


def kill_and_resume(tmp_path, spec: dict, kill_from: int, kill_before: int, timeout: float = 300):
    """Train `spec` uninterrupted, then again killed with SIGKILL once its checkpoint has reached round `kill_from`
    (and before `kill_before`) and restarted: (resumed result, reference result, round it resumed at)."""
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    ref = subprocess.run(train_cmd(spec_path, tmp_path / "ref.json", tmp_path / "ref.pt"), env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    assert not (tmp_path / "ref.pt").exists()  # the checkpoint is removed once the result is written

    out, ckpt = tmp_path / "run.json", tmp_path / "run.pt"
    proc = subprocess.Popen(train_cmd(spec_path, out, ckpt), env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if ckpt.exists() and torch.load(ckpt, weights_only=False)["next_round"] >= kill_from:
                break
        except Exception:  # the checkpoint is being replaced
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must leave no results file"
    killed_at = torch.load(ckpt, weights_only=False)["next_round"]
    assert kill_from <= killed_at < kill_before, "the run should have been killed mid-training"

    again = subprocess.run(train_cmd(spec_path, out, ckpt), env=env, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    resumed = json.loads(out.read_text())
    assert resumed["resumed_at_rounds"] == [killed_at]
    return resumed, json.loads((tmp_path / "ref.json").read_text()), killed_at


@pytest.mark.parametrize("row", ["FedAvgM, E=40", "FedDF, E=40"])
def test_sigkill_and_restart_resumes_bit_identical(tmp_path, row):
    paper = load_paper("feddf")
    t = paper["tables"]["table1"]
    r = [x["label"] for x in t["rows"]].index(row)
    spec = resolve_cell(paper, "table1", r, 3, "smoke").specs[0]
    spec = {**spec, "training": {**spec["training"], "rounds": 8}}
    resumed, reference, _ = kill_and_resume(tmp_path, spec, kill_from=3, kill_before=8, timeout=120)
    assert repeatable_part(resumed) == repeatable_part(reference)


CENTRAL = {"dataset": {"name": "mnist1d"}, "partition": {"scheme": "iid", "clients": 1},
           "model": {"name": "cnn1d", "channels": [64, 64, 64]},
           "training": {"rounds": 10, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                        "momentum": 0.9, "weight_decay": 1e-4, "lr_decay": 0.9, "keep_optimizer": True}, "seed": 3}


KD_SVD_TEACHER = {"name": "cnn1d", "channels": [16, 16, 16], "blocks": 2}  # the stage widths of the student below


@pytest.mark.kill
@pytest.mark.parametrize("method,kill", [
    ({"name": "centralised"}, (6, 10)),
    ({"name": "kd_fidelity", "teachers": 2, "teacher_rounds": 4, "extra": "mixup"}, (6, 10)),
    # KD-SVD: killed in the student's rounds (the teacher's weights and the student's optimiser in the checkpoint)
    ({"name": "kd_svd", "distill": "svd", "teacher_rounds": 4, "teacher_model": KD_SVD_TEACHER}, (6, 10)),
    # FSP: killed in its initialisation stage, between the teacher's rounds and the student's
    ({"name": "kd_svd", "distill": "fsp", "teacher_rounds": 3, "init_rounds": 4, "teacher_model": KD_SVD_TEACHER},
     (4, 7)),
], ids=["centralised", "kd_fidelity", "kd_svd", "kd_svd_fsp"])
def test_centralised_run_killed_and_resumed_equals_uninterrupted(tmp_path, method, kill):
    """A centralised run (one client holding all the data), KD fidelity's teachers-then-student run killed in the
    student's rounds, and KD-SVD's teacher-then-student run (FSP's: teacher, initialisation, student)."""
    spec = {**CENTRAL, "method": method}
    if method["name"] == "kd_svd":  # a student with the teacher's stage widths
        spec["model"] = {"name": "cnn1d", "channels": [16, 16, 16]}
    resumed, reference, _ = kill_and_resume(tmp_path, spec, kill_from=kill[0], kill_before=kill[1])
    assert repeatable_part(resumed) == repeatable_part(reference)
    assert resumed["provenance"] and resumed["data"]["fingerprint"] == reference["data"]["fingerprint"]


@pytest.mark.kill
def test_two_stream_adaptation_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    """Beyond Sharing Weights' two-stream run (source and target streams, the per-layer relation a, b, Adam's state
    and the target batches drawn per round) killed in its adaptation epochs."""
    paper = load_paper("beyond_sharing")
    rows = [r["label"] for r in paper["tables"]["mnist_usps"]["rows"]]
    spec = resolve_cell(paper, "mnist_usps", rows.index("Ours (related weights)"), 0, "smoke").specs[0]
    spec = {**spec, "dataset": {"name": spec["dataset"]["name"]},  # all 2,000 + 1,497 training images: slower rounds
            "method": {**spec["method"], "pretrain_rounds": 3}, "training": {**spec["training"], "rounds": 8}}
    resumed, reference, killed_at = kill_and_resume(tmp_path, spec, kill_from=4, kill_before=8)
    assert killed_at > spec["method"]["pretrain_rounds"]


FRSKD_RUN = {"dataset": {"name": "digits5", "train_limit": 600, "test_limit": 200},
             "partition": {"scheme": "iid", "clients": 1}, "model": {"name": "resnet8", "norm": "bn", "width": 4},
             "training": {"rounds": 8, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                          "momentum": 0.9, "weight_decay": 5e-4, "lr_decay": 0.9, "keep_optimizer": True}, "seed": 2}


@pytest.mark.kill
@pytest.mark.parametrize("method", [{"name": "frskd"}, {"name": "cs_kd"}])
def test_frskd_and_cs_kd_killed_and_resumed_equal_uninterrupted(tmp_path, method):
    """FRSKD (the classifier and its self-teacher in one model, one optimiser state) and CS-KD (same-class partners
    drawn per round) killed mid-way and restarted end bit-identical to an uninterrupted run."""
    resumed, reference, _ = kill_and_resume(tmp_path, {**FRSKD_RUN, "method": method}, kill_from=3, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)


@pytest.mark.kill
def test_fedgen_killed_and_resumed_equals_uninterrupted(tmp_path):
    """FedGen: the generator's weights, BatchNorm statistics and Adam state, its learning-rate decay and the
    generated samples drawn per (round, client) survive a SIGKILL; the resumed run ends bit-identical."""
    paper = load_paper("fedgen")
    rows = [r["label"] for r in paper["tables"]["table1"]["rows"]]
    spec = resolve_cell(paper, "table1", rows.index("FedGen"), 0, "smoke").specs[0]
    spec = {**spec, "method": {**spec["method"], "generator_steps": 20},
            "training": {**spec["training"], "rounds": 8, "local_steps": 10}}
    resumed, reference, killed_at = kill_and_resume(tmp_path, spec, kill_from=3, kill_before=8)
    assert killed_at >= 2  # the generator regularises the clients from round 1 on: resumed with a trained generator
    assert repeatable_part(resumed) == repeatable_part(reference)


FEDREID_RUN = {"dataset": {"name": "reid_synth_smoke"}, "partition": {"scheme": "domain", "clients": 6},
               "model": {"name": "cnn", "channels": [4, 8], "hidden": [16], "norm": "bn"},
               "training": {"rounds": 8, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                            "momentum": 0.9, "weight_decay": 5e-4}, "seed": 1}


@pytest.mark.kill
@pytest.mark.parametrize("method", [{"name": "fedpav", "kd": True, "kd_every": 2, "cdw": True},
                                    {"name": "reid_local"}], ids=["fedpav_kd_cdw", "reid_local"])
def test_fedreid_killed_and_resumed_equals_uninterrupted(tmp_path, method):
    """FedReID's FedPav with distillation every other round and cosine distance weights (the clients' local
    identity classifiers and distances in the checkpoint), and local training, killed mid-way and restarted."""
    resumed, reference, _ = kill_and_resume(tmp_path, {**FEDREID_RUN, "method": method}, kill_from=3, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)


@pytest.mark.kill
def test_fedgkt_killed_and_resumed_equals_uninterrupted(tmp_path):
    """FedGKT's state (each client's edge model and Adam state, the server's logits of every training sample, the
    server's Adam state) survives a SIGKILL between rounds."""
    paper = load_paper("fedgkt")
    spec = resolve_cell(paper, "accuracy", 0, 0, "smoke").specs[0]
    spec = {**spec, "dataset": {"name": "mnist5k", "train_limit": 500, "test_limit": 200},  # slower rounds
            "training": {**spec["training"], "rounds": 8}}
    resumed, reference, _ = kill_and_resume(tmp_path, spec, kill_from=3, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)


FEDKD_RUN = {"dataset": {"name": "mnist5k", "train_limit": 800, "test_limit": 200},
             "partition": {"scheme": "iid", "clients": 4}, "model": {"name": "fedavg_cnn", "channels": [8, 16], "fc_width": 32},
             "training": {"rounds": 8, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.001,
                          "optimizer": "adam"},
             "evaluation": {"per_client": True}, "seed": 1,
             "method": {"name": "fedkd", "hidden": False, "mentor": {"name": "fedavg_cnn", "channels": [16, 32], "fc_width": 64}}}


@pytest.mark.kill
def test_fedkd_killed_and_resumed_equals_uninterrupted(tmp_path):
    """FedKD (each client's mentor kept by the algorithm, the last broadcast's size, the threshold schedule) killed
    mid-way and restarted ends bit-identical to an uninterrupted run."""
    resumed, reference, _ = kill_and_resume(tmp_path, FEDKD_RUN, kill_from=3, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)
    assert resumed["metrics"]["bytes_down"] == reference["metrics"]["bytes_down"]


FEDALIGN_RUN = {"dataset": {"name": "mnist5k", "train_limit": 800, "test_limit": 200},
                "partition": {"scheme": "dirichlet", "clients": 4, "alpha": 0.5, "min_size": 10},
                "model": {"name": "resnet8", "norm": "bn", "width": 4}, "evaluation": {"local_flops": True},
                "training": {"rounds": 8, "client_fraction": 1.0, "local_epochs": 2, "batch_size": 32, "lr": 0.05,
                             "momentum": 0.9, "weight_decay": 5e-4, "max_grad_norm": 10}, "seed": 1}


@pytest.mark.kill
@pytest.mark.parametrize("method", [{"name": "fedalign"}, {"name": "gradaug", "subnets": 2, "scales": [1.0, 0.75]}],
                         ids=["fedalign", "gradaug"])
def test_fedalign_and_regularisers_killed_and_resumed_equal_uninterrupted(tmp_path, method):
    """FedAlign (with gradient clipping) and GradAug (random widths and resolutions drawn from the global generator,
    which the checkpoint carries; mixup and stochastic depth draw from it the same way), with the per-round FLOP
    count, killed mid-way and restarted."""
    resumed, reference, _ = kill_and_resume(tmp_path, {**FEDALIGN_RUN, "method": method}, kill_from=3, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)


@pytest.mark.kill
def test_festa_split_run_killed_and_resumed_equals_uninterrupted(tmp_path):
    """FeSTA's split training (per-client heads and tails, the shared body, one Adam state over all of them, heads
    and tails averaged within each task on unifying rounds) killed mid-way and restarted ends bit-identical."""
    paper = load_paper("festa")
    spec = resolve_cell(paper, "tasks", 0, 0, "smoke").specs[0]
    spec = {**spec, "method": {**spec["method"], "unify_every": 3}, "training": {**spec["training"], "rounds": 8}}
    resumed, reference, _ = kill_and_resume(tmp_path, spec, kill_from=2, kill_before=8)
    assert repeatable_part(resumed) == repeatable_part(reference)
