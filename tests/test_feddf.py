"""FedDF: the distillation loss, the ensemble teacher, the early stopping and the server-side fusion step, each
pinned against the authors' code (epfml/federated-learning-public-code, codes/FedDF-code; see
papers/feddf/README.md) by an independent computation."""
import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import papers.feddf.method as feddf_method
from common.data import load_dataset as _load_dataset
from common.data.partition import partition
from common.distill import ensemble_probs, kd_loss, predict_logits
from common.fl import RunContext, get_algorithm
from common.fl.algorithms import weighted_mean
from common.fl.engine import FederatedRun, History, clone_state, evaluate
from common.models import Classifier, build_model
from papers.feddf.method import FedDF, distill, feddf_loss, holdout_indices, mean_kd_loss, teacher_probs

PER_ROUND_KEYS = ("distill_steps", "distill_best_step", "distill_changed", "distill_val_acc_before",
                  "distill_val_acc_after", "distill_kl_before", "distill_kl_after", "distill_pred_changed")


load_dataset = functools.lru_cache(_load_dataset)  # each loads in seconds on a busy machine: load once


@pytest.fixture(autouse=True)
def cached_datasets(monkeypatch):
    monkeypatch.setattr(feddf_method, "load_dataset", load_dataset)


def small_model():
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU()), 12, 4)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hand_kl(p, student_logits, temp):
    """mean over samples of sum_c p log(p / softmax(s / T)): no T^2 factor."""
    q = softmax(student_logits / temp)
    return (p * (np.log(p) - np.log(q))).sum(1).mean()


def test_kd_loss_keeps_hintons_t_squared_by_default():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    for temp in (1.0, 3.0):
        p = softmax(t.numpy() / temp)
        expected = hand_kl(p, s.numpy(), temp)
        assert abs(kd_loss(s, torch.as_tensor(p), temp).item() - expected * temp ** 2) < 1e-5
        assert abs(kd_loss(s, torch.as_tensor(p), temp, t_squared=False).item() - expected) < 1e-5


@pytest.mark.parametrize("ensemble", ["logits", "probs"])
def test_feddf_loss_at_temperature_matches_the_authors(ensemble):
    """(d) Authors' BaseKTSolver.divergence: KL(teacher || log_softmax(s / T)), no T^2; avg_logits tempers the mean
    logits, avg_probs averages the clients' softmaxes at T = 1."""
    g = torch.Generator().manual_seed(2)
    clients = [torch.randn(6, 4, generator=g) * 2 for _ in range(3)]
    s = torch.randn(6, 4, generator=g) * 2
    temp = 3.0
    c = np.stack([l.numpy() for l in clients])
    p = softmax(c.mean(0) / temp) if ensemble == "logits" else softmax(c).mean(0)
    expected = hand_kl(p, s.numpy(), temp)
    got = feddf_loss(s, teacher_probs(clients, temp, ensemble), temp).item()
    assert abs(got - expected) < 1e-5
    assert abs(got - expected * temp ** 2) > 1e-2                   # not folded in as T^2
    if ensemble == "probs":                                          # the teacher is not tempered
        assert abs(got - hand_kl(softmax(c / temp).mean(0), s.numpy(), temp)) > 1e-3


def test_feddf_teacher_in_probs_mode_is_the_untempered_mean_softmax():
    torch.manual_seed(0)
    algo = FedDF(temperature=4.0, ensemble="probs")
    algo.teacher_model, algo.x_unlabeled = small_model(), torch.randn(20, 1, 4, 4)
    models = [small_model() for _ in range(3)]
    expected = np.mean([softmax(m.eval()(algo.x_unlabeled).detach().numpy()) for m in models], axis=0)
    np.testing.assert_allclose(algo.teacher([clone_state(m) for m in models]).numpy(), expected, rtol=1e-5)


def test_ensemble_probs_logits_and_probs():
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(6, 4, generator=g) for _ in range(3)]
    mean_logits = np.mean([l.numpy() for l in logits], axis=0)
    np.testing.assert_allclose(ensemble_probs(logits, average="logits").numpy(), softmax(mean_logits), rtol=1e-5)
    expected_probs = np.mean([softmax(l.numpy()) for l in logits], axis=0)
    np.testing.assert_allclose(ensemble_probs(logits, average="probs").numpy(), expected_probs, rtol=1e-5)
    assert not np.allclose(softmax(mean_logits), expected_probs)


def test_student_gradient_is_clipped_at_norm_5():
    """(a) Authors' update_student: clip_grad_norm_(student, 5) before each Adam step. Reference: the same steps
    with the gradient rescaled by hand; the unclipped reference ends elsewhere."""
    torch.manual_seed(0)
    x = torch.randn(40, 1, 4, 4) * 30                                # large inputs: gradient norms far above 5
    probs = ensemble_probs([predict_logits(small_model(), x)])
    student, steps, lr, temp = small_model(), 3, 1e-2, 2.0

    def reference(clip: bool):
        m = copy.deepcopy(student)
        opt = torch.optim.Adam(m.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        norms = []
        for _ in range(steps):
            log_q = torch.log_softmax(m(x) / temp, 1)
            loss = (probs * (probs.log() - log_q)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            norm = torch.sqrt(sum((p.grad ** 2).sum() for p in m.parameters())).item()
            norms.append(norm)
            if clip and norm > 5:
                for p in m.parameters():
                    p.grad *= 5 / (norm + 1e-6)
            opt.step()
            sched.step()
        return m, norms

    clipped, norms = reference(True)
    unclipped, _ = reference(False)
    assert min(norms) > 5
    info = distill(student, x, probs, x[:10], torch.zeros(10, dtype=torch.long), steps=steps, batch_size=len(x),
                   lr=lr, patience=100, eval_every=100, temperature=temp, generator=torch.Generator().manual_seed(0))
    assert info["steps"] == steps and info["best_step"] == steps     # the last step is evaluated and kept
    for a, b, c in zip(student.parameters(), clipped.parameters(), unclipped.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(a, c, rtol=1e-3, atol=1e-4) for a, c in zip(student.parameters(),
                                                                            unclipped.parameters()))


def test_early_stopping_judges_validation_accuracy_and_returns_the_distilled_model():
    """(b) The checkpoint kept is the one of best top-1 validation accuracy (strictly better than earlier ones),
    evaluated every `eval_every` steps, stopping `patience` steps after it; (c) it is returned even when the
    undistilled start had the better validation accuracy (the authors never fall back to the average)."""
    torch.manual_seed(0)
    x, x_val = torch.randn(400, 1, 4, 4), torch.randn(200, 1, 4, 4)
    teacher = ensemble_probs([predict_logits(small_model(), x)])
    student = small_model()
    start = clone_state(student)
    y_val = predict_logits(student, x_val).argmax(1)                  # the start is perfect on validation ...
    acc_start, _ = evaluate(student, x_val, y_val)
    assert acc_start == 1.0                                           # ... and distilling to another model hurts
    evals = []

    def on_eval(step, acc, model):
        evals.append((step, acc, clone_state(model), mean_kd_loss(model, x, teacher, 1.0)))

    steps, eval_every, patience = 300, 10, 50
    info = distill(student, x, teacher, x_val, y_val, steps=steps, batch_size=32, lr=1e-2, patience=patience,
                   eval_every=eval_every, temperature=1.0, generator=torch.Generator().manual_seed(0), on_eval=on_eval)
    # Independent replay of the authors' rule on the recorded evaluations.
    assert [e[0] for e in evals] == list(range(eval_every, evals[-1][0] + 1, eval_every))
    best_step, best_acc, stop = None, -1.0, None
    for step, acc, _, _ in evals:
        if acc > best_acc:
            best_step, best_acc = step, acc
        if step - best_step >= patience:
            stop = step
            break
    assert stop is not None and stop < steps                          # early stopping happened
    assert info["steps"] == stop and info["best_step"] == best_step and info["val_accuracy"] == best_acc
    kept = next(e for e in evals if e[0] == best_step)
    assert all(torch.equal(v, kept[2][k]) for k, v in student.state_dict().items())
    assert evaluate(student, x_val, y_val)[0] == best_acc < acc_start  # worse than the start, returned anyway
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())
    assert evals[-1][3] < kept[3]                                     # a later checkpoint had the lower KL: not used


def test_distillation_lowers_kl_to_ensemble_on_held_out_data():
    torch.manual_seed(0)
    x = torch.randn(600, 1, 4, 4)
    teachers = [small_model() for _ in range(3)]
    probs = ensemble_probs([predict_logits(t, x) for t in teachers])
    student = small_model()
    x_tr, x_val, p_tr, p_val = x[:480], x[480:], probs[:480], probs[480:]
    before = mean_kd_loss(student, x_val, p_val, 1.0)
    info = distill(student, x_tr, p_tr, x_val, p_val.argmax(1), steps=150, batch_size=32, lr=1e-2, patience=150,
                   eval_every=10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert info["steps"] == 150
    assert mean_kd_loss(student, x_val, p_val, 1.0) < 0.5 * before


def tiny_context(seed=0, clients=4, spec_extra=None):
    data = load_dataset("mnist5k", train_limit=200, test_limit=100)
    parts = partition(data.train.y, "iid", seed=seed, clients=clients)

    def make():
        return build_model("cnn", 1, 10, 28, norm="bn")
    spec = {"seed": seed, "method": {"name": "feddf"},
            "training": {"rounds": 2, "client_fraction": 0.5, "local_epochs": 1, "batch_size": 32, "lr": 0.1},
            **(spec_extra or {})}
    torch.manual_seed(seed)
    return RunContext(spec, data, parts, make(), make, torch.device("cpu"), "data", history=History()), make


TINY = {"name": "feddf", "unlabeled": "digits28", "steps": 10, "batch_size": 64, "patience": 10, "eval_every": 5,
        "unlabeled_limit": 200}


def test_validation_split_is_held_out_of_the_training_set_and_of_every_client():
    ctx, _ = tiny_context()
    n = len(ctx.data.train.y)
    algo = get_algorithm(dict(TINY, val_fraction=0.1))
    algo.setup(ctx)
    val = holdout_indices(n, 0.1, 0)
    assert len(val) == 20 and len(torch.unique(val)) == 20
    torch.testing.assert_close(algo.x_val, ctx.data.train.x[val])
    torch.testing.assert_close(algo.y_val, ctx.data.train.y[val])
    held = set(val.tolist())
    assert all(held.isdisjoint(p.tolist()) for p in ctx.parts)        # no client trains on it
    assert sorted(torch.cat(ctx.parts).tolist() + val.tolist()) == list(range(n))
    sizes = [len(p) for p in ctx.parts]
    algo.setup(ctx)                                                   # a resumed run sets up again: same split
    assert [len(p) for p in ctx.parts] == sizes
    assert not torch.equal(holdout_indices(n, 0.1, 1), val)           # another seed, another split
    with pytest.raises(ValueError):
        FedDF(val_fraction=0.0)


def test_feddf_fusion_starts_from_fedavg_and_moves_towards_the_ensemble():
    data = load_dataset("mnist5k", train_limit=200, test_limit=100)

    def make():
        return build_model("cnn", 1, 10, 28, norm="bn")
    torch.manual_seed(0)
    spec = {"seed": 0, "method": {"name": "feddf"},
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 20, "batch_size": 32, "lr": 0.1}}
    # Two clients that disagree: each holds half of the classes.
    label_split = [torch.nonzero(data.train.y < 5).flatten(), torch.nonzero(data.train.y >= 5).flatten()]
    ctx = RunContext(spec, data, label_split, make(), make, torch.device("cpu"), "data", history=History())
    algo = get_algorithm({"name": "feddf", "unlabeled": "digits28", "steps": 30, "batch_size": 64, "lr": 1e-3,
                          "patience": 30, "eval_every": 10, "unlabeled_limit": 400})
    assert isinstance(algo, FedDF)
    algo.setup(ctx)
    global_state = clone_state(ctx.model)
    run, clients = FederatedRun(ctx, algo), []
    for k in range(2):
        ctx.model.load_state_dict(global_state)
        run.local_train(k, 0)
        clients.append(clone_state(ctx.model))
    ctx.model.load_state_dict(global_state)
    weights = [len(p) for p in ctx.parts]
    fused = algo.server_update(global_state, clients, weights, 0)
    target = algo.teacher(clients)
    avg_model, fused_model = make(), make()
    avg_model.load_state_dict(weighted_mean(clients, weights))
    fused_model.load_state_dict(fused)
    # Averaging two disagreeing models loses the ensemble's predictions; distillation recovers part of them.
    kl_avg, kl_fused = (mean_kd_loss(m, algo.x_unlabeled, target, 1.0) for m in (avg_model, fused_model))
    assert kl_fused < 0.9 * kl_avg
    h = ctx.history.extra
    assert h["distill_changed"] == [1] and h["distill_steps"][0] > 0
    assert abs(h["distill_kl_before"][0] - kl_avg) < 1e-5 and abs(h["distill_kl_after"][0] - kl_fused) < 1e-5
    assert h["distill_val_acc_after"][0] == evaluate(fused_model, algo.x_val, algo.y_val)[0]
    assert h["distill_val_acc_before"][0] == evaluate(avg_model, algo.x_val, algo.y_val)[0]


def test_feddf_run_logs_distillation_per_round():
    ctx, _ = tiny_context()
    hist = FederatedRun(ctx, get_algorithm(TINY)).train(progress=False)
    assert hist.rounds == [1, 2]
    for key in PER_ROUND_KEYS:
        assert len(hist.extra[key]) == 2, key
    assert all(0 < s <= 10 for s in hist.extra["distill_steps"])
    assert all(b in (5, 10) for b in hist.extra["distill_best_step"])
    assert all(0 <= f <= 1 for f in hist.extra["distill_pred_changed"])
    assert hist.extra["distill_changed"] == [1, 1]
