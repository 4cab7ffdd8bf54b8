"""Stanton et al. (2021), "Does Knowledge Distillation Really Work?": the fidelity metrics and the distillation loss
against direct computations, the method's teachers and initialisations, and centralised runs (the suite's
`centralised` method and `kd_fidelity`) that resume bit-identically after a SIGKILL."""

import numpy as np
import pytest
import torch

from common.distill import kd_loss, log_ensemble_probs, predictive_kl, top1_agreement
from common.errors import SuiteError
from common.experiments import load_paper, paper_runs
from common.report.claims import HOLDS, CONTRADICTED, INCONCLUSIVE, at_most, column_better



def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# --- metrics on hand-made predictions ----------------------------------------------------------------------------
def test_agreement_on_hand_made_predictions():
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4]])
    student = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    # argmax teacher: 0, 1, 2, 0; student: 0, 0, 2, 2 -> 2 of 4 agree
    assert top1_agreement(teacher, student) == 0.5
    assert top1_agreement(teacher.log(), student.log()) == 0.5  # logits/log-probabilities: the same argmax
    assert top1_agreement(teacher, teacher) == 1.0


def test_predictive_kl_on_hand_made_predictions():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
    q = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.25, 0.25, 0.5]])
    direct = np.mean([sum(p[i, j] * np.log(p[i, j] / q[i, j]) for j in range(3)) for i in range(3)])
    got = predictive_kl(torch.tensor(p).log(), torch.tensor(q).log())
    assert got == pytest.approx(direct, rel=1e-12)
    assert predictive_kl(torch.tensor(p).log(), torch.tensor(p).log()) == 0.0
    # a zero-probability teacher class contributes 0 (0 log 0 = 0), not nan
    p0 = torch.tensor([[1.0, 0.0]])
    q0 = torch.tensor([[0.5, 0.5]])
    assert predictive_kl(p0.log(), q0.log()) == pytest.approx(np.log(2.0))


def test_ensemble_distribution_is_the_mean_of_the_members_softmaxes():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(5, 4, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    direct = np.mean([np_softmax(z.numpy()) for z in logits], axis=0)
    assert np.allclose(log_ensemble_probs(logits).exp().numpy(), direct, atol=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_against_an_independent_computation(temperature):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64)
    t_logits = [torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    p_t = np.mean([np_softmax(z.numpy() / temperature) for z in t_logits], axis=0)  # the ensemble's target at T
    log_q = np.log(np_softmax(s.numpy() / temperature))
    direct = temperature ** 2 * np.mean(np.sum(p_t * (np.log(p_t) - log_q), axis=1))  # Hinton: T^2 KL(p_t || q)
    assert kd_loss(s, torch.tensor(p_t), temperature).item() == pytest.approx(direct, rel=1e-10)


# --- claim kinds the paper needs ----------------------------------------------------------------------------------
def test_at_most_and_column_better_checks():
    values = {("m = 1", "Agree."): {0: 80.0, 1: 82.0, 2: 81.0}, ("m = 1", "Stud."): {0: 70.0, 1: 71.0, 2: 70.5},
              ("m = 1", "Teach."): {0: 69.0, 1: 70.0, 2: 69.4}}
    rows, cols = ["m = 1"], ["Agree.", "Stud.", "Teach."]
    assert at_most(values, rows, cols, False, bound=95, columns=["Agree."]).outcome == HOLDS
    assert at_most(values, rows, cols, False, bound=70, columns=["Agree."]).outcome == CONTRADICTED
    assert at_most(values, rows, cols, False, bound=81.5, columns=["Agree."]).outcome == INCONCLUSIVE
    assert column_better(values, rows, cols, False, pairs=[["Stud.", "Teach."]]).outcome == HOLDS
    assert column_better(values, rows, cols, False, pairs=[["Teach.", "Stud."]]).outcome == CONTRADICTED
    exact = {k: {None: float(np.mean(list(v.values())))} for k, v in values.items()}  # the paper's published means
    assert at_most(exact, rows, cols, False, bound=95, columns=["Agree."]).outcome == HOLDS


# --- the method ---------------------------------------------------------------------------------------------------
def tiny_spec(seed=0, rounds=4, channels=(4, 4), train_limit=200, **method):
    return {"dataset": {"name": "mnist1d", "train_limit": train_limit, "test_limit": 100},
            "partition": {"scheme": "iid", "clients": 1},
            "model": {"name": "cnn1d", "channels": list(channels)},
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                         "momentum": 0.9, "weight_decay": 1e-4, "keep_optimizer": True},
            "method": {"name": "kd_fidelity", "teacher_rounds": 2, **method}, "seed": seed}


def test_teachers_are_shared_across_ensemble_sizes_and_metrics_are_logged():
    from common.train import execute
    one = execute(tiny_spec(teachers=1), progress=False)
    three = execute(tiny_spec(teachers=3), progress=False)
    m1, m3 = one["metrics"], three["metrics"]
    assert m1["phase"] == ["teacher", "teacher", "student", "student"]
    # teacher k of a seed is the same network whatever the ensemble size
    assert m1["teacher_members"][-1][0] == m3["teacher_members"][-1][0]
    assert len(m3["teacher_members"][-1]) == 3
    for key in ("agreement", "kl", "train_agreement", "train_kl"):  # a value per round, None while teachers train
        assert m1[key][:2] == [None, None] and all(v is not None for v in m1[key][2:]), key
    assert all(v is not None for v in m1["teacher_accuracy"])
    assert 0.0 <= m1["agreement"][-1] <= 1.0 and m1["kl"][-1] >= 0.0


def test_initialisations():
    from common.fl.engine import clone_state
    from papers.kd_fidelity.method import interpolate
    t = {"w": torch.ones(3), "n": torch.tensor(5)}
    r = {"w": torch.zeros(3), "n": torch.tensor(0)}
    mixed = interpolate(t, r, 0.25)
    assert torch.allclose(mixed["w"], torch.full((3,), 0.25)) and int(mixed["n"]) == 5
    from common.train import execute
    base = execute(tiny_spec(), progress=False)
    full = execute(tiny_spec(init="interpolate", lam=1.0), progress=False)  # starts at the teacher itself
    assert full["metrics"]["agreement"][2] > base["metrics"]["agreement"][2] or full["metrics"]["agreement"][2] == 1.0
    shared = execute(tiny_spec(init="teacher_init"), progress=False)
    assert shared["metrics"]["teacher_accuracy"] == base["metrics"]["teacher_accuracy"]
    assert clone_state  # imported for its use in the method


def test_bad_parameters_are_clear_errors():
    from common.fl import get_algorithm
    with pytest.raises(SuiteError, match="init"):
        get_algorithm({"name": "kd_fidelity", "init": "zeros"})
    with pytest.raises(SuiteError, match="extra"):
        get_algorithm({"name": "kd_fidelity", "extra": "gan"})
    with pytest.raises(SuiteError, match="teachers"):
        get_algorithm({"name": "kd_fidelity", "teachers": 0})
    with pytest.raises(SuiteError, match="student_lr"):
        get_algorithm({"name": "kd_fidelity", "student_lr": 0.0})
    from common.train import execute
    with pytest.raises(SuiteError, match="teacher_rounds"):
        execute(tiny_spec(rounds=2), progress=False)


def test_extra_distillation_inputs():
    from common.data.offline import mnist1d_unlabelled
    x = mnist1d_unlabelled(50, seed=3)
    assert x.shape == (50, 1, 40) and torch.equal(x, mnist1d_unlabelled(50, seed=3))
    with pytest.raises(SuiteError, match="seed 42"):
        mnist1d_unlabelled(50, seed=42)
    from common.train import execute
    for extra in ("mixup", "noise", "generated"):
        r = execute(tiny_spec(extra=extra, extra_size=100), progress=False)
        assert r["status"] == "completed", extra


def test_paper_yaml_resolves_at_every_scale():
    paper = load_paper("kd_fidelity")
    assert {"table1", "table2"} <= set(paper["tables"])
    assert paper["tables"]["table1"]["paper"][0][0].startswith("77.174")
    assert len(paper["scales"]["mini"]["seeds"]) >= 3
    mini = paper_runs("kd_fidelity", "mini")
    assert {s["dataset"]["name"] for s in mini.values()} == {"mnist1d"}
    big = paper_runs("kd_fidelity", "paper")
    assert {s["model"]["name"] for s in big.values()} == {"resnet56", "resnet20"}
    assert {s["dataset"]["name"] for s in big.values()} == {"cifar100"}
