"""FedAlign (Mendieta et al. 2022) and the local-generality regularisers: each piece against an independent
computation (numpy / torch.linalg / a narrow network built with the sliced weights)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.models import BasicBlock, build_model
from papers.fedalign.method import (FedAlign, GradAug, Mixup, StochDepth, last_stage, lipschitz_loss, mixup_batch,
                                    slim_block, slim_forward, spectral_norm_power, stage_passes,
                                    stochastic_depth_forward, survival_probabilities, transmission_matrix)


def resnet8(width=8, seed=0):
    torch.manual_seed(seed)
    return build_model("resnet8", in_channels=3, num_classes=10, input_size=28, norm="bn", width=width).train()


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# --- the Lipschitz term ----------------------------------------------------------------------------------------------
def test_spectral_norm_power_iteration_matches_the_largest_singular_value():
    g = torch.Generator().manual_seed(0)
    tm = torch.randn(5, 8, 6, generator=g, dtype=torch.float64)
    expected = np.linalg.svd(tm.numpy(), compute_uv=False)[:, 0]
    np.testing.assert_allclose(spectral_norm_power(tm, iterations=500).numpy(), expected, rtol=1e-8)
    np.testing.assert_allclose(torch.linalg.matrix_norm(tm, ord=2).numpy(), expected, rtol=1e-10)
    # the authors' 10 steps from the ones vector, on matrices with a clear gap between the two largest singular values
    u, _ = torch.linalg.qr(torch.randn(5, 8, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 6, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 1.0, 0.8, 0.5, 0.2, 0.1], dtype=torch.float64)
    gapped = u[:, :, :6] @ torch.diag(s) @ v.transpose(1, 2)
    np.testing.assert_allclose(spectral_norm_power(gapped).numpy(), 3.0, rtol=1e-6)


def test_transmission_matrix_is_the_fsp_matrix_of_pooled_input_and_output():
    g = torch.Generator().manual_seed(0)
    fin, fout = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 5, 4, 4, generator=g)
    a = fin.numpy().reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(2, 3, 16)  # 2x2 average pooling
    b = fout.numpy().reshape(2, 5, 16)
    expected = np.einsum("nis,njs->nij", a, b) / 16
    np.testing.assert_allclose(transmission_matrix(fin, fout).numpy(), expected, rtol=1e-5, atol=1e-7)


def test_lipschitz_loss_is_the_mse_of_the_spectral_norms_and_only_the_slim_pass_gets_gradients():
    g = torch.Generator().manual_seed(0)
    full = (torch.rand(3, 4, 8, 8, generator=g, requires_grad=True), torch.rand(3, 6, 4, 4, generator=g, requires_grad=True))
    slim = (torch.rand(3, 2, 8, 8, generator=g), torch.rand(3, 3, 4, 4, generator=g, requires_grad=True))
    loss = lipschitz_loss(full, slim, iterations=200)
    sf = torch.linalg.matrix_norm(transmission_matrix(*full).detach(), ord=2)
    ss = torch.linalg.matrix_norm(transmission_matrix(*slim).detach(), ord=2)
    np.testing.assert_allclose(loss.item(), ((ss - sf) ** 2).mean().item(), rtol=1e-4)
    loss.backward()
    assert full[0].grad is None and full[1].grad is None and slim[1].grad.abs().sum() > 0


# --- the slim block: a slice of the full block's weights ---------------------------------------------------------------
def test_slim_block_equals_a_narrow_block_built_from_the_sliced_weights():
    torch.manual_seed(0)
    full = BasicBlock(16, 32, 2, "bn").train()
    narrow = BasicBlock(4, 8, 2, "bn").train()
    for (name, p), (_, q) in zip(full.state_dict().items(), narrow.state_dict().items()):
        q.copy_(p[tuple(slice(0, n) for n in q.shape)] if q.dim() else p)
    x = torch.rand(5, 16, 14, 14)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    out = slim_block(full, x[:, :4], 0.25)
    torch.testing.assert_close(out, narrow(x[:, :4]))
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())  # running statistics untouched


def test_slim_network_equals_a_narrow_network_with_the_sliced_weights_and_full_width_is_the_model():
    model, narrow = resnet8(8), resnet8(2)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.state_dict().items(), narrow.state_dict().items()):
            q.copy_(p[tuple(slice(0, n) for n in q.shape)] if q.dim() else p)
    x, _ = batch()
    torch.testing.assert_close(slim_forward(model, x, 0.25), narrow(x))
    torch.testing.assert_close(slim_forward(model, x, 1.0), resnet8(8)(x))


def test_fedalign_slim_stage_is_the_last_stage_on_the_detached_sliced_input():
    model = resnet8(8)
    first, last = last_stage(model)
    assert isinstance(model.features[first], BasicBlock) and model.features[first].conv1.out_channels == 32
    x, _ = batch()
    logits, (f_in, f_out), (s_in, s_out) = stage_passes(model, x, 0.25)
    torch.testing.assert_close(logits, resnet8(8)(x))
    assert f_in.shape[1] == 16 and f_out.shape[1] == 32 and s_in.shape[1] == 4 and s_out.shape[1] == 8
    torch.testing.assert_close(s_in, f_in[:, :4].detach())
    assert not s_in.requires_grad
    torch.testing.assert_close(s_out, slim_block(model.features[first], f_in[:, :4].detach(), 0.25))


def test_fedalign_gradients_reach_the_shared_weights_through_both_paths():
    model = resnet8(8)
    x, y = batch()
    block = model.features[last_stage(model)[0]]
    # the Lipschitz term alone: only the slim slice of the last stage's weights, nothing before the stage
    _, full, slim = stage_passes(model, x, 0.25)
    lipschitz_loss(full, slim).backward()
    w = block.conv2.weight.grad
    assert w[:8, :8].abs().sum() > 0
    assert w[8:].abs().sum() == 0 and w[:, 8:].abs().sum() == 0
    assert block.conv1.weight.grad[:8, :4].abs().sum() > 0 and block.conv1.weight.grad[:, 4:].abs().sum() == 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.features[0].parameters())
    lip_grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    # the cross-entropy of the full pass: every weight, the slice included
    model.zero_grad(set_to_none=True)
    logits, _, _ = stage_passes(model, x, 0.25)
    ce = F.cross_entropy(logits, y)
    ce.backward()
    ce_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert block.conv2.weight.grad[8:].abs().sum() > 0 and model.features[0].weight.grad.abs().sum() > 0
    # FedAlign's loss: CE + mu * (CE / L) * L with the ratio a constant; its value is (1 + mu) CE and its gradient
    # the sum of both paths' gradients
    model.zero_grad(set_to_none=True)
    algo = FedAlign(mu=0.45, width=0.25)
    loss = algo.local_loss(model, x, y)
    _, full, slim = stage_passes(model, x, 0.25)
    lip = lipschitz_loss(full, slim).item()
    np.testing.assert_allclose(loss.item(), 1.45 * ce.item(), rtol=1e-5)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ce_grads[n] + 0.45 * ce.item() / lip * lip_grads[n], rtol=1e-4, atol=1e-7)


# --- GradAug, mixup, stochastic depth ---------------------------------------------------------------------------------
def test_gradaug_loss_is_ce_plus_kl_of_each_subnetwork_to_the_full_network():
    model = resnet8(8)
    x, y = batch()
    algo = GradAug(subnets=3, min_width=0.25, scales=[1.0, 0.75])
    torch.manual_seed(5)
    loss = algo.local_loss(model, x, y)
    model = resnet8(8)  # the same weights and BatchNorm statistics as before the first call
    torch.manual_seed(5)
    widths = algo.widths()
    assert widths[-1] == 0.25 and widths == sorted(widths, reverse=True) and all(0.25 <= w <= 1 for w in widths)
    full = model(x)
    p = F.softmax(full.detach(), 1).numpy()
    expected = F.cross_entropy(full, y).item()
    for w in widths:
        side = round([1.0, 0.75][int(torch.randint(2, ()).item())] * 28)
        xs = x if side == 28 else F.interpolate(x, size=(side, side), mode="bilinear", align_corners=True)
        q = F.log_softmax(slim_forward(model, xs, w), 1).detach().numpy()
        expected += float(np.sum(p * (np.log(p) - q)) / len(y))
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)


def test_mixup_mixes_inputs_and_targets_with_one_lambda():
    model = resnet8(8).eval()
    x, y = batch()
    torch.manual_seed(3)
    xm, ya, yb, lam = mixup_batch(x, y, 1.0)
    assert 0 <= lam <= 1 and torch.equal(ya, y)
    torch.manual_seed(3)
    lam2 = float(torch.distributions.Beta(1.0, 1.0).sample())
    perm = torch.randperm(len(y))
    assert lam == lam2 and torch.equal(yb, y[perm])
    torch.testing.assert_close(xm, lam * x + (1 - lam) * x[perm])
    torch.manual_seed(3)
    loss = Mixup(alpha=1.0).local_loss(model, x, y)
    out = model(xm).detach().numpy()
    logp = out - np.log(np.exp(out).sum(1, keepdims=True))
    idx = np.arange(len(y))
    expected = -(lam * logp[idx, y.numpy()] + (1 - lam) * logp[idx, y[perm].numpy()]).mean()
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    torch.testing.assert_close(Mixup(alpha=0.0).local_loss(model, x, y), F.cross_entropy(model(x), y))


def test_stochastic_depth_survival_schedule_and_dropped_blocks():
    assert survival_probabilities(3, 0.5) == [1.0, 0.75, 0.5]
    np.testing.assert_allclose(survival_probabilities(5, 0.5), np.linspace(1, 0.5, 5))
    model = resnet8(8)
    x, y = batch()
    torch.testing.assert_close(stochastic_depth_forward(model, x, [1.0, 1.0, 1.0]), resnet8(8)(x))
    # every residual branch dropped: only the shortcuts remain
    out = stochastic_depth_forward(model, x, [0.0, 0.0, 0.0])
    h = model.features[2](model.features[1](model.features[0](x)))
    for i in (3, 4, 5):
        h = torch.relu(model.features[i].shortcut(h))
    torch.testing.assert_close(out, model.head(model.features[7](model.features[6](h))))
    # the last block (survival 0.5) is dropped in about half of the passes, and a kept branch is scaled by 1 / p
    model.eval()  # BatchNorm with running statistics: the passes differ only in the drops
    without_last = stochastic_depth_forward(model, x, [1.0, 1.0, 0.0])
    torch.manual_seed(0)
    dropped = sum(torch.equal(stochastic_depth_forward(model, x, [1.0, 1.0, 0.5]), without_last) for _ in range(400))
    assert 160 < dropped < 240
    h = model.features[4](model.features[3](model.features[2](model.features[1](model.features[0](x)))))
    last = model.features[5]
    branch = last.n2(last.conv2(torch.relu(last.n1(last.conv1(h)))))
    kept = model.head(model.features[7](model.features[6](torch.relu(2 * branch + last.shortcut(h)))))
    torch.manual_seed(0)
    outs = [stochastic_depth_forward(model, x, [1.0, 1.0, 0.5]) for _ in range(20)]
    assert any(torch.allclose(o, kept, atol=1e-5) for o in outs)
    assert all(torch.allclose(o, kept, atol=1e-5) or torch.equal(o, without_last) for o in outs)
    assert StochDepth(0.5).local_loss(resnet8(8), x, y).isfinite()


# --- FLOPs of one local step -----------------------------------------------------------------------------------------
def conv_flops(model, side=28):
    """Forward FLOPs (2 per multiply-add) of the model's convolutions and linear head, from the layer shapes."""
    total, first = 0, None
    handles = []

    def hook(m, inp, out):
        nonlocal total, first
        if isinstance(m, torch.nn.Conv2d):
            f = 2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] // out.shape[0]
        else:
            f = 2 * m.in_features * m.out_features
        first = f if first is None else first
        total += f
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    for h in handles:
        h.remove()
    return total, first


def test_local_step_flops_count_forward_and_backward_and_leave_the_run_unchanged():
    from common.data import Dataset, Split
    from common.fl.algorithms import Algorithm
    from common.fl.engine import FederatedRun, RunContext
    x, y = batch(40)
    data = Dataset("t", Split(x, y), Split(x[:8], y[:8]), 10, "test data")
    spec = {"seed": 0, "method": {"name": "fedavg"},
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 8, "lr": 0.1}}
    counts = {}
    for name, algo in [("fedavg", Algorithm()), ("fedalign", FedAlign())]:
        model = resnet8(8)
        ctx = RunContext(spec, data, [torch.arange(40)], model, None, torch.device("cpu"), "data")
        run = FederatedRun(ctx, algo)
        algo.setup(ctx)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        rng = torch.get_rng_state()
        counts[name] = run.local_step_flops(0)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())
    forward, stem = conv_flops(resnet8(8))
    # backward: the gradient of every weight (as much as the forward) and of every layer's input but the image's
    assert counts["fedavg"] == 3 * forward - stem
    assert 1.0 < counts["fedalign"] / counts["fedavg"] < 1.1


def test_minimise_clips_the_gradient_norm_when_asked():
    from common.fl.engine import minimise
    for clip, expected in [(None, 5.0 * 1000), (10.0, 10.0)]:
        w = torch.zeros(3, requires_grad=True)
        opt = torch.optim.SGD([w], lr=1.0)
        minimise(iter([(w * torch.tensor([3000.0, 4000.0, 0.0])).sum()]), opt, clip)
        np.testing.assert_allclose(w.detach().norm().item(), expected, rtol=1e-6)
