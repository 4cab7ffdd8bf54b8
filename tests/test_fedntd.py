"""FedNTD / FedLSD: the distillation losses, beta = 0 as FedAvg, and the forgetting and weight-divergence
diagnostics, each against a direct computation."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.data import Dataset, Split
from common.errors import SuiteError
from common.fl import FederatedRun, RunContext, get_algorithm
from common.fl.engine import History
from common.models import Classifier
from common.report.metrics import forgetting, weight_divergence as wd_metric
from common.train import execute
from papers.fedntd.method import (FedLSD, FedNTD, classwise_accuracy, diagnostic_subset, lsd_loss, not_true_logits,
                                  ntd_loss)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def direct_ntd(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float) -> float:
    """Per sample: the full softmax of each model with the true class removed and the rest renormalised to sum
    to one, then KL(teacher || student); mean over the batch."""
    out = []
    for si, ti, yi in zip(s, t, y):
        p, q = softmax(ti / tau), softmax(si / tau)
        mask = np.arange(len(p)) != yi
        p, q = p[mask] / p[mask].sum(), q[mask] / q[mask].sum()
        out.append(np.sum(p * (np.log(p) - np.log(q))))
    return float(np.mean(out))


def direct_lsd(s: np.ndarray, t: np.ndarray, y: np.ndarray, tau: float, beta: float) -> float:
    ce = np.mean([-np.log(softmax(si)[yi]) for si, yi in zip(s, y)])
    kl = np.mean([np.sum(softmax(ti / tau) * (np.log(softmax(ti / tau)) - np.log(softmax(si / tau))))
                  for si, ti in zip(s, t)])
    return float((1 - beta) * ce + beta * kl)


def batch(seed=0, n=7, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 2, torch.randn(n, c, generator=g) * 2, torch.randint(0, c, (n,), generator=g)


def test_not_true_logits_drop_exactly_the_true_column():
    s = torch.arange(12.0).view(3, 4)
    y = torch.tensor([0, 2, 3])
    assert not_true_logits(s, y).tolist() == [[1, 2, 3], [4, 5, 7], [8, 9, 10]]


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_ntd_loss_is_tau_squared_times_the_kl_of_the_renormalised_not_true_distributions(tau):
    s, t, y = batch()
    got = ntd_loss(s, t, y, tau).item()
    assert abs(got - tau ** 2 * direct_ntd(s.double().numpy(), t.double().numpy(), y.numpy(), tau)) < 1e-5
    # and it is not the full-softmax KL (which depends on the true class)
    assert abs(got / tau ** 2 - lsd_loss(s, t, tau).item()) > 1e-3


def test_ntd_loss_has_the_authors_tau_squared_factor():
    """The authors' current NTD_Loss: tau^2 * KLDiv(batchmean) of the temperature-tau not-true softmaxes; pinned
    at tau = 2.5 against the KL written out with plain arithmetic (the factor 6.25 is not there at tau = 1)."""
    s, t, y = batch(4)
    tau = 2.5
    kl = []
    for si, ti, yi in zip(s.double().tolist(), t.double().tolist(), y.tolist()):
        si, ti = [v for j, v in enumerate(si) if j != yi], [v for j, v in enumerate(ti) if j != yi]
        zs, zt = sum(np.exp(v / tau) for v in si), sum(np.exp(v / tau) for v in ti)
        kl.append(sum(np.exp(b / tau) / zt * (b / tau - np.log(zt) - a / tau + np.log(zs)) for a, b in zip(si, ti)))
    direct = float(np.mean(kl))
    assert direct > 1e-2
    assert ntd_loss(s, t, y, tau).item() == pytest.approx(6.25 * direct, rel=1e-5)


def test_ntd_loss_ignores_the_true_class_logit():
    s, t, y = batch(1)
    base = ntd_loss(s, t, y, 2.0).item()
    s2, t2 = s.clone(), t.clone()
    rows = torch.arange(len(y))
    s2[rows, y] += torch.linspace(-5, 9, len(y))
    t2[rows, y] -= 7.0
    assert ntd_loss(s2, t2, y, 2.0).item() == pytest.approx(base, abs=1e-6)
    # no gradient reaches the true-class logit
    s3 = s.clone().requires_grad_(True)
    ntd_loss(s3, t, y, 2.0).backward()
    assert torch.all(s3.grad[rows, y] == 0) and s3.grad.abs().sum() > 0
    # changing a not-true logit does change it
    s4 = s.clone()
    s4[rows, (y + 1) % s.shape[1]] += 3.0
    assert abs(ntd_loss(s4, t, y, 2.0).item() - base) > 1e-3


@pytest.mark.parametrize("beta,tau", [(0.3, 1.0), (0.8, 2.0)])
def test_fedlsd_loss_against_the_direct_formula(beta, tau):
    s, t, y = batch(2)
    algo = FedLSD(beta=beta, tau=tau)
    algo.teacher = lambda x: t  # the "teacher model" returns fixed logits
    algo.teacher_logits = lambda x: t
    model = lambda x: s  # noqa: E731
    got = algo.local_loss(model, None, y).item()
    assert abs(got - direct_lsd(s.double().numpy(), t.double().numpy(), y.numpy(), tau, beta)) < 1e-5


def test_fedntd_loss_is_ce_plus_beta_ntd():
    s, t, y = batch(3)
    algo = FedNTD(beta=0.7, tau=2.0)
    algo.teacher_logits = lambda x: t
    got = algo.local_loss(lambda x: s, None, y).item()
    ce = np.mean([-np.log(softmax(si)[yi]) for si, yi in zip(s.double().numpy(), y.numpy())])
    assert abs(got - (ce + 0.7 * 4.0 * direct_ntd(s.double().numpy(), t.double().numpy(), y.numpy(), 2.0))) < 1e-5


def test_invalid_hyper_parameters_are_one_clear_error():
    with pytest.raises(SuiteError, match="beta"):
        get_algorithm({"name": "fedlsd", "beta": 1.0})
    with pytest.raises(SuiteError, match="tau"):
        get_algorithm({"name": "fedntd", "tau": 0})


SPEC = {"seed": 0, "dataset": {"name": "mnist5k", "train_limit": 400, "test_limit": 100},
        "partition": {"scheme": "shards", "clients": 10, "shards_per_client": 2},
        "model": {"name": "fedavg_cnn", "norm": "none", "channels": [4, 8], "fc_width": 16},
        "method": {"name": "fedavg"},
        "training": {"rounds": 3, "client_fraction": 0.3, "local_epochs": 2, "batch_size": 20, "lr": 0.05,
                     "momentum": 0.9, "weight_decay": 1e-5, "lr_decay": 0.99}}


def run_with(method: dict) -> dict:
    return execute({**copy.deepcopy(SPEC), "method": method}, progress=False)


def test_beta_zero_reproduces_fedavg_exactly_and_diagnostics_change_nothing():
    fedavg = run_with({"name": "fedavg"})
    for method in ({"name": "fedntd", "beta": 0.0}, {"name": "fedlsd", "beta": 0.0}, {"name": "fedavg_diag"}):
        other = run_with(method)
        for key in ("test_accuracy", "test_loss", "train_loss"):
            assert other["metrics"][key] == fedavg["metrics"][key], (method, key)
        assert len(other["metrics"]["forgetting"]) == 3
    ntd = run_with({"name": "fedntd", "beta": 1.0})
    assert ntd["metrics"]["train_loss"] != fedavg["metrics"]["train_loss"]


def test_lr_decay_changes_the_run_and_one_is_the_constant_rate():
    a = execute(copy.deepcopy(SPEC), progress=False)
    no_decay = copy.deepcopy(SPEC)
    del no_decay["training"]["lr_decay"]
    b = execute(no_decay, progress=False)
    one = copy.deepcopy(SPEC)
    one["training"]["lr_decay"] = 1.0
    c = execute(one, progress=False)
    assert a["metrics"]["train_loss"][0] == b["metrics"]["train_loss"][0]  # round 0: lr * 0.99**0
    assert a["metrics"]["train_loss"][1:] != b["metrics"]["train_loss"][1:]
    assert b["metrics"]["train_loss"] == c["metrics"]["train_loss"]


# --- diagnostics -------------------------------------------------------------------------------------------------
def tiny_setup(method: dict, seed: int = 0):
    """Four classes, two clients that hold two classes each, a linear model."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 6, generator=g) * 1.5
    y_tr = torch.arange(4).repeat_interleave(20)
    y_te = torch.arange(4).repeat_interleave(15)
    x_tr = means[y_tr] + torch.randn(80, 6, generator=g)
    x_te = means[y_te] + torch.randn(60, 6, generator=g)
    data = Dataset("toy", Split(x_tr, y_tr), Split(x_te, y_te), 4)
    parts = [torch.cat([torch.arange(0, 20), torch.arange(20, 30)]),    # classes 0 and 1 (20 + 10 samples)
             torch.cat([torch.arange(40, 60), torch.arange(60, 80)])]   # classes 2 and 3

    def make():
        return Classifier(nn.Identity(), 6, 4)

    torch.manual_seed(seed)
    spec = {"seed": seed, "method": method,
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 3, "batch_size": 10, "lr": 0.5}}
    ctx = RunContext(spec, data, parts, make(), make, torch.device("cpu"), "data", history=History())
    return ctx, get_algorithm(method)


def pretrain(ctx, steps: int = 50) -> None:
    """Make the context's model a global model that knows every class (full-batch SGD on all training data)."""
    opt = torch.optim.SGD(ctx.model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(ctx.model(ctx.data.train.x), ctx.data.train.y).backward()
        opt.step()


def direct_class_acc(model, x, y, c):
    with torch.no_grad():
        pred = model(x).argmax(1)
    return np.array([np.mean([(pred[i] == y[i]).item() for i in range(len(y)) if y[i] == k]) for k in range(c)])


def test_forgetting_and_weight_divergence_against_a_direct_computation():
    ctx, algo = tiny_setup({"name": "fedavg_diag"})
    run = FederatedRun(ctx, algo)
    algo.setup(ctx)
    pretrain(ctx)
    global_state = {k: v.detach().clone() for k, v in ctx.model.state_dict().items()}
    global_model = ctx.make_model()
    global_model.load_state_dict(global_state)
    acc_g = direct_class_acc(global_model, ctx.data.test.x, ctx.data.test.y, 4)
    expected, sizes = [], []
    for k in range(2):
        ctx.model.load_state_dict(global_state)
        algo.begin_client(ctx.model, global_state, k)
        run.local_train(k, 0)
        algo.end_client(ctx.model, global_state, k, 0)
        acc_l = direct_class_acc(ctx.model, ctx.data.test.x, ctx.data.test.y, 4)
        counts = np.bincount(ctx.data.train.y[ctx.parts[k]].numpy(), minlength=4)
        p = counts / counts.sum()
        w_out = (1 - p) / 3
        absent = (counts == 0) / (counts == 0).sum()
        flat_l = torch.cat([q.detach().flatten() for q in ctx.model.parameters()]).double()
        flat_g = torch.cat([global_state[n].flatten() for n, _ in ctx.model.named_parameters()]).double()
        expected.append({"local_out_accuracy": w_out @ acc_l, "global_out_accuracy": w_out @ acc_g,
                         "forgetting": w_out @ acc_g - w_out @ acc_l, "local_in_accuracy": p @ acc_l,
                         "absent_forgetting": absent @ (acc_g - acc_l),
                         "weight_divergence": ((flat_l - flat_g).norm() / flat_g.norm()).item(),
                         "weight_divergence_abs": (flat_l - flat_g).norm().item()})
        sizes.append(counts.sum())
    got = algo.evaluate(run, global_state)
    w = np.array(sizes) / sum(sizes)
    for key in ("local_out_accuracy", "global_out_accuracy", "forgetting", "local_in_accuracy", "absent_forgetting"):
        assert got[key] == pytest.approx(sum(wi * e[key] for wi, e in zip(w, expected)), abs=1e-12), key
    for key in ("weight_divergence", "weight_divergence_abs"):
        assert got[key] == pytest.approx(np.mean([e[key] for e in expected]), rel=1e-9), key
    assert got["forgetting"] > 0  # local training on two classes forgets the other two
    assert got["weight_divergence"] > 0
    # the round's accumulators are cleared for the next round
    assert algo.round_diag == [] and algo.global_acc is None


def test_classwise_accuracy_and_subset():
    ctx, _ = tiny_setup({"name": "fedavg"})
    m = ctx.make_model()
    got = classwise_accuracy(m, ctx.data.test.x, ctx.data.test.y, 4).numpy()
    np.testing.assert_allclose(got, direct_class_acc(m, ctx.data.test.x, ctx.data.test.y, 4))
    idx = diagnostic_subset(ctx.data.test.y, 4, 8)
    assert ctx.data.test.y[idx].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(diagnostic_subset(ctx.data.test.y, 4, None)) == 60


def test_report_metrics_read_the_logged_diagnostics():
    res = {"metrics": {"forgetting": [0.5, None, 0.2, 0.4], "weight_divergence": [0.1, 0.2, 0.3, 0.4]}}
    assert forgetting(res, last_rounds=3) == (pytest.approx(30.0), False)
    assert forgetting(res) == (pytest.approx(100 * 1.1 / 3), False)
    assert wd_metric(res, last_rounds=2) == (pytest.approx(35.0), False)
    with pytest.raises(ValueError, match="logged no 'forgetting'"):
        forgetting({"metrics": {}}, last_rounds=2)
