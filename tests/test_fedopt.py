"""Adaptive server optimisers (the authors' Keras Adam / Adagrad / Yogi rule) and SCAFFOLD, against independent
computations."""
import numpy as np
import pytest
import torch
from torch import nn

from common.fl import FederatedRun, get_algorithm
from common.fl.server_optim import AdagradServer, AdamServer, YogiServer
from test_fl import make_ctx, random_states, run, tiny_data, tiny_model

BETA1, BETA2, TAU, LR = 0.8, 0.95, 0.05, 0.3


# --- the authors' update rules, written out in NumPy (google-research/federated, optimization/: the server optimiser
# is Keras' Adam or Adagrad (TF 2.x OptimizerV2) or their utils/optimizers/yogi.py, applied to the pseudo-gradient
# g = x - mean(x_i), epsilon = tau, initial accumulator 0) -------------------------------------------------------------

def keras_adam(x, grads, lr, beta1, beta2, eps):
    m, v, out = np.zeros_like(x), np.zeros_like(x), []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        lr_t = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        x = x - lr_t * m / (np.sqrt(v) + eps)
        out.append(x)
    return out


def authors_yogi(x, grads, lr, beta1, beta2, eps, v0=0.0):
    m, v, out = np.zeros_like(x), np.full_like(x, v0), []
    for t, g in enumerate(grads, start=1):
        m = beta1 * m + (1 - beta1) * g if beta1 > 0 else g
        v = v + (1 - beta2) * np.sign(g * g - v) * g * g
        lr_t = lr * np.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        x = x - lr_t * m / (np.sqrt(v) + eps)
        out.append(x)
    return out


def keras_adagrad(x, grads, lr, eps, v0=0.0):
    acc, out = np.full_like(x, v0), []
    for g in grads:
        acc = acc + g * g
        x = x - lr * g / (np.sqrt(acc) + eps)
        out.append(x)
    return out


def adagrad_with_momentum(x, grads, lr, beta1, eps):
    """FedAdagrad with beta1 > 0 (not in the authors' runs): Algorithm 2's momentum line, Adagrad's accumulator."""
    m, acc, out = np.zeros_like(x), np.zeros_like(x), []
    for g in grads:
        m = beta1 * m + (1 - beta1) * g
        acc = acc + g * g
        x = x - lr * m / (np.sqrt(acc) + eps)
        out.append(x)
    return out


def authors_rule(name, x, grads, lr=LR, beta1=BETA1, beta2=BETA2, tau=TAU):
    if name == "fedadam":
        return keras_adam(x, grads, lr, beta1, beta2, tau)
    if name == "fedyogi":
        return authors_yogi(x, grads, lr, beta1, beta2, tau)
    if beta1 == 0:
        return keras_adagrad(x, grads, lr, tau)
    return adagrad_with_momentum(x, grads, lr, beta1, tau)


OPTIMIZERS = {"fedadagrad": AdagradServer, "fedadam": AdamServer, "fedyogi": YogiServer}

# Tiny pseudo-gradients: a zero coordinate, a sign change, a large and a small coordinate, and a coordinate that is
# 0 in one step only (Yogi's sign(g^2 - v) takes all three values over these steps).
X0 = np.array([0.5, -1.0, 2.0, 0.0, 0.25])
GRADS = [np.array([0.2, 0.0, -3.0, 1e-3, 0.4]),
         np.array([-0.1, 0.0, -2.0, 1e-3, 0.0]),
         np.array([0.3, 0.0, 4.0, -2e-3, 0.5])]


def steps_of(optimizer, x0, grads, **hyper):
    p = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = optimizer([p], **hyper)
    out = []
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append(p.detach().numpy().copy())
    return out


@pytest.mark.parametrize("name,beta1,beta2", [
    ("fedadam", 0.9, 0.999), ("fedadam", BETA1, BETA2), ("fedadam", 0.0, BETA2),
    ("fedyogi", 0.9, 0.999), ("fedyogi", BETA1, BETA2), ("fedyogi", 0.0, BETA2),
    ("fedadagrad", 0.0, 0.0), ("fedadagrad", BETA1, 0.0)])
@pytest.mark.parametrize("tau", [1e-3, TAU])
def test_first_three_steps_follow_the_authors_rule(name, beta1, beta2, tau):
    ours = steps_of(OPTIMIZERS[name], X0, GRADS, lr=LR, beta1=beta1, beta2=beta2, tau=tau)
    expected = authors_rule(name, X0, GRADS, beta1=beta1, beta2=beta2, tau=tau)
    for t in range(3):
        np.testing.assert_allclose(ours[t], expected[t], rtol=1e-12, atol=1e-14, err_msg=f"{name}, step {t + 1}")


def test_first_step_by_hand():
    """Step 1 in closed form (v_0 = 0): Adam and Yogi move by lr * sqrt(1 - b2) * g / (sqrt(1 - b2) |g| + tau),
    the same for both (Yogi's sign(g^2 - 0) = 1); Adagrad by lr * g / (|g| + tau). Numbers for g = 0.2, lr = 0.1,
    beta2 = 0.99, tau = 0.01: sqrt(0.01) = 0.1, so Adam's step is 0.1 * 0.1 * 0.2 / (0.1 * 0.2 + 0.01)
    = 0.1 * 0.02 / 0.03."""
    x0, g = np.array([1.0]), [np.array([0.2])]
    for opt in (AdamServer, YogiServer):
        (x1,) = steps_of(opt, x0, g, lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
        np.testing.assert_allclose(x1, 1.0 - 0.1 * 0.02 / 0.03, rtol=1e-12)
    (x1,) = steps_of(AdagradServer, x0, g, lr=0.1, beta1=0.0, beta2=0.0, tau=0.01)
    np.testing.assert_allclose(x1, 1.0 - 0.1 * 0.2 / 0.21, rtol=1e-12)


def test_not_the_printed_algorithm2():
    """The printed Algorithm 2 (second moment of the momentum, v_{-1} = tau^2, no bias correction) gives a different
    FedAdam step 1: lr * (1 - b1) g / (sqrt(b2 tau^2 + (1 - b2) (1 - b1)^2 g^2) + tau). Guard against going back."""
    lr, b1, b2, tau, g = 1.0, 0.9, 0.999, 1e-3, 1e-2
    printed = lr * (1 - b1) * g / (np.sqrt(b2 * tau ** 2 + (1 - b2) * ((1 - b1) * g) ** 2) + tau)
    (x1,) = steps_of(AdamServer, np.array([0.0]), [np.array([g])], lr=lr, beta1=b1, beta2=b2, tau=tau)
    authors = lr * np.sqrt(1 - b2) * g / (np.sqrt(1 - b2) * g + tau)
    np.testing.assert_allclose(-x1, authors, rtol=1e-12)
    assert printed / authors > 1.9  # the printed rule's first step is about twice the authors'


def method_spec(name, **kw):
    params = {"server_lr": LR, "beta1": 0.0 if name == "fedadagrad" else BETA1, "tau": TAU, **kw}
    if name != "fedadagrad":  # Adagrad's second moment has no decay rate
        params.setdefault("beta2", BETA2)
    return {"name": name, **params}


@pytest.mark.parametrize("name", ["fedadagrad", "fedadam", "fedyogi"])
def test_first_three_rounds_of_the_engine_follow_the_authors_rule(name):
    """Through `server_update`: the pseudo-gradient is x_t - mean(x_i) (clients weighted equally here)."""
    spec = method_spec(name)
    ctx = make_ctx(spec)
    algo = get_algorithm(spec)
    algo.setup(ctx)
    names = [n for n, _ in ctx.model.named_parameters()]
    state = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rounds = [random_states(3, seed=20 + r) for r in range(3)]
    ours = []
    for r, clients in enumerate(rounds):
        state = algo.server_update(state, clients, [1, 1, 1], r)
        ours.append(state)
    for n in names:
        x = ctx.model.state_dict()[n].double().numpy()
        grads, xs = [], [x]
        # the clients' states are fixed, so each round's pseudo-gradient depends on the previous round's model
        for r, clients in enumerate(rounds):
            grads.append(xs[-1] - np.mean([c[n].double().numpy() for c in clients], axis=0))
            xs.append(authors_rule(name, x, grads, beta1=spec["beta1"])[-1])
        for r in range(3):
            np.testing.assert_allclose(ours[r][n].double().numpy(), xs[r + 1], rtol=1e-5, atol=1e-6,
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
