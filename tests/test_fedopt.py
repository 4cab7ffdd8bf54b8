"""Adaptive server optimisers (Algorithm 2 of Reddi et al.) and SCAFFOLD, against independent computations."""
import numpy as np
import pytest
import torch
from torch import nn

from common.fl import FederatedRun, get_algorithm
from test_fl import make_ctx, random_states, run, tiny_data, tiny_model

BETA1, BETA2, TAU, LR = 0.8, 0.95, 0.05, 0.3


def algorithm2_numpy(method, x, client_rounds, lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU):
    """Algorithm 2 written out for one parameter array: x_t after each round, clients weighted equally."""
    delta, v, out = np.zeros_like(x), np.full_like(x, tau ** 2), []
    for clients in client_rounds:
        mean_change = np.mean([xi - x for xi in clients], axis=0)
        delta = beta1 * delta + (1 - beta1) * mean_change
        d2 = delta ** 2
        if method == "fedadagrad":
            v = v + d2
        elif method == "fedyogi":
            v = v - (1 - beta2) * d2 * np.sign(v - d2)
        else:
            v = beta2 * v + (1 - beta2) * d2
        x = x + lr * delta / (np.sqrt(v) + tau)
        out.append(x)
    return out


def method_spec(name, **kw):
    params = {"server_lr": LR, "beta1": BETA1, "tau": TAU, **kw}
    if name != "fedadagrad":  # Adagrad's second moment has no decay rate
        params.setdefault("beta2", BETA2)
    return {"name": name, **params}


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_first_two_rounds_match_algorithm2(name):
    spec = method_spec(name)
    ctx = make_ctx(spec)
    algo = get_algorithm(spec)
    algo.setup(ctx)
    names = [n for n, _ in ctx.model.named_parameters()]
    state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rounds = [random_states(3, seed=20 + r) for r in range(2)]
    ours = []
    for r, clients in enumerate(rounds):
        state = algo.server_update(state, clients, [1, 1, 1], r)
        ours.append(state)
    for n in names:
        x0 = ctx.model.state_dict()[n].double().numpy()
        expected = algorithm2_numpy(name, x0, [[c[n].double().numpy() for c in clients] for clients in rounds])
        for r in range(2):
            np.testing.assert_allclose(ours[r][n].double().numpy(), expected[r], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}, parameter {n}, round {r}")


def test_methods_differ_in_second_moment_only():
    """Same clients, same hyper-parameters: the three methods give three different models after two rounds."""
    finals = []
    for name in ["fedadagrad", "fedadam", "fedyogi"]:
        spec = method_spec(name)
        ctx = make_ctx(spec)
        algo = get_algorithm(spec)
        algo.setup(ctx)
        state = ctx.model.state_dict()
        for r in range(2):
            state = algo.server_update(state, random_states(3, seed=20 + r), [1, 1, 1], r)
        finals.append(state["head.weight"])
    assert not torch.allclose(finals[0], finals[1]) and not torch.allclose(finals[1], finals[2])


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_server_lr_zero_leaves_parameters_unchanged(name):
    spec = method_spec(name, server_lr=0.0)
    initial = make_ctx(spec).model.state_dict()  # same seed, same initialisation as the run's
    hist, final = run(spec, rounds=2)
    assert len(hist.rounds) == 2
    for n, _ in tiny_model().named_parameters():
        assert torch.equal(final[n], initial[n]), n
    # running statistics are not optimised: they are the clients' average, as in every algorithm of the engine
    assert not torch.equal(final["features.2.running_mean"], initial["features.2.running_mean"])


def test_adaptive_methods_learn():
    for name in ["fedadagrad", "fedadam", "fedyogi"]:
        hist, _ = run({"name": name, "server_lr": 0.1}, rounds=6, fraction=1.0, epochs=2)
        assert hist.test_accuracy[-1] > 0.6, (name, hist.test_accuracy)


def test_hyper_parameters_are_checked():
    from common.errors import SuiteError
    with pytest.raises(SuiteError, match="no parameter"):
        get_algorithm({"name": "fedadagrad", "beta2": 0.9})
    with pytest.raises(ValueError, match="invalid hyper-parameters"):
        get_algorithm({"name": "fedadam", "tau": 0.0}).setup(make_ctx({"name": "fedadam"}))


# --- SCAFFOLD -------------------------------------------------------------------------------------------------------

def params_of(state, names):
    return [state[n].double() for n in names]


def test_scaffold_control_variates_follow_option_ii():
    ctx = make_ctx({"name": "scaffold"})
    algo = get_algorithm({"name": "scaffold", "server_lr": 0.5})
    algo.setup(ctx)
    names = algo.param_names
    n_clients, lr = len(ctx.parts), ctx.spec["training"]["lr"]
    model = ctx.model
    c = [torch.zeros_like(p).double() for p in model.parameters()]
    c_i = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for r, (clients, steps) in enumerate([([0, 3], [4, 7]), ([3, 5], [2, 5])]):  # client 3 takes part twice
        trained = random_states(len(clients), seed=40 + r)
        x = params_of(state, names)
        deltas = []
        for k, y_state, K in zip(clients, trained, steps):
            model.load_state_dict(state)
            algo.begin_client(model, state, k)
            model.load_state_dict(y_state)  # stands for K local steps
            algo.end_client(model, state, k, K)
            old = c_i.get(k, [torch.zeros_like(t) for t in x])
            c_i[k] = [ci - cg + (xt - yt) / (K * lr) for ci, cg, xt, yt in zip(old, c, x, params_of(y_state, names))]
            deltas.append([a - b for a, b in zip(c_i[k], old)])
            for ours, expected in zip(algo.c_clients[k], c_i[k]):
                torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
        state = algo.server_update(state, trained, [1, 1], r)
        c = [cg + len(clients) / n_clients * torch.stack([d[j] for d in deltas]).mean(0) for j, cg in enumerate(c)]
        for ours, expected in zip(algo.c, c):
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)
        # the model moves by server_lr times the mean client change
        for n, xt in zip(names, x):
            mean_y = (trained[0][n].double() + trained[1][n].double()) / 2
            torch.testing.assert_close(state[n].double(), xt + 0.5 * (mean_y - xt), rtol=1e-5, atol=1e-5)


def test_scaffold_local_gradient_is_corrected_and_reported_loss_is_cross_entropy():
    ctx = make_ctx({"name": "scaffold"})
    algo = get_algorithm({"name": "scaffold"})
    algo.setup(ctx)
    g = torch.Generator().manual_seed(5)
    algo.c = [torch.randn(c.shape, generator=g) for c in algo.c]
    algo.c_clients[2] = [torch.randn(c.shape, generator=g) for c in algo.c]
    model, data = ctx.model, tiny_data()
    algo.begin_client(model, model.state_dict(), 2)
    x, y = data.train.x[:16], data.train.y[:16]
    model.train()
    ce = nn.functional.cross_entropy(model(x), y)
    g_ce = torch.autograd.grad(ce, list(model.parameters()))
    loss = algo.local_loss(model, x, y)
    g_corr = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ce)
    for gc, gs, c, ci in zip(g_ce, g_corr, algo.c, algo.c_clients[2]):
        torch.testing.assert_close(gs - gc, c - ci, rtol=1e-4, atol=1e-5)


def test_scaffold_first_round_equals_fedavg_and_then_learns():
    """With all control variates zero, SCAFFOLD's first round is FedAvg's round bit for bit."""
    h_avg, s_avg = run({"name": "fedavg"}, rounds=1)
    h_sc, s_sc = run({"name": "scaffold"}, rounds=1)
    assert h_avg.train_loss == h_sc.train_loss and all(torch.equal(s_avg[k], s_sc[k]) for k in s_avg)
    hist, _ = run({"name": "scaffold"}, rounds=8, fraction=1.0, epochs=3)
    assert hist.test_accuracy[-1] > 0.6


def test_scaffold_keeps_client_control_variates_after_training():
    ctx = make_ctx({"name": "scaffold"}, rounds=2)
    algo = get_algorithm({"name": "scaffold"})
    FederatedRun(ctx, algo).train(progress=False)
    assert algo.c_clients and all(any(t.abs().sum() > 0 for t in ci) for ci in algo.c_clients.values())
