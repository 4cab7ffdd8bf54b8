"""Gradient Dropping (papers/graddrop): R = 0 is dense data-parallel SGD bit for bit, the residual carries exactly
what was dropped, the threshold drops R of the entries, and the bytes equal hand-computed counts."""
import math

import pytest
import torch

from common.fl import FederatedRun, get_algorithm
from papers.graddrop.method import drop_threshold, keep_mask

from test_communication import BUFFERS, MODEL_BYTES, PARAMETERS
from test_fl import make_ctx


def data_parallel(method, rounds=3):
    """`rounds` steps of data-parallel SGD over the 6 clients of tests.test_fl's tiny task."""
    ctx = make_ctx(method, rounds=rounds, fraction=1.0)
    ctx.spec["training"]["local_steps"] = 1
    run = FederatedRun(ctx, get_algorithm(method))
    return run, run.train(progress=False)


def test_drop_ratio_zero_is_dense_sgd_bit_for_bit():
    dense_run, dense = data_parallel({"name": "fedavg"})
    drop_run, drop = data_parallel({"name": "graddrop", "drop_ratio": 0.0})
    for key in ("test_accuracy", "test_loss", "train_loss"):
        assert getattr(drop, key) == getattr(dense, key)
    for k, v in dense_run.final_state.items():
        assert torch.equal(drop_run.final_state[k], v), k
    assert drop.extra["bytes_up"][0] == [8 * PARAMETERS + 4 * BUFFERS + 8] * 6  # every entry as (index, value)


def test_dropping_changes_the_run():
    _, dense = data_parallel({"name": "fedavg"})
    _, drop = data_parallel({"name": "graddrop", "drop_ratio": 0.9})
    assert drop.train_loss != dense.train_loss


def one_worker(algo_params, residual=None, seed=1):
    """A worker's model after one local step u, and the algorithm after end_client (optionally with a residual)."""
    method = {"name": "graddrop", **algo_params}
    ctx = make_ctx(method, fraction=1.0)
    algo = get_algorithm(method)
    algo.setup(ctx)
    model = ctx.model
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    u = [torch.randn(p.shape, generator=g) * 0.01 for p in model.parameters()]
    with torch.no_grad():
        for p, step in zip(model.parameters(), u):
            p.sub_(step)
    if residual is not None:
        algo.residuals[0] = [r.clone() for r in residual]
    trained = [p.detach().clone() for p in model.parameters()]
    algo.end_client(model, global_state, 0, 1)
    return algo, model, global_state, trained, u


@pytest.mark.parametrize("with_old_residual", [False, True])
def test_residual_carries_exactly_what_was_dropped(with_old_residual):
    old = None
    if with_old_residual:
        g = torch.Generator().manual_seed(7)
        old = [torch.randn(p.shape, generator=g) * 0.02 for p in make_ctx({"name": "fedavg"}).model.parameters()]
    algo, model, global_state, trained, u = one_worker({"drop_ratio": 0.8}, residual=old)
    names = algo.param_names
    kept_total = 0
    for i, (name, p) in enumerate(zip(names, model.parameters())):
        # the worker's own arithmetic: its step as the difference of weights, plus the old residual
        v = global_state[name] - trained[i] if old is None else (global_state[name] - trained[i]) + old[i]
        new = algo.residuals[0][i]
        sent = p.detach()
        dropped = sent == global_state[name]
        kept = ~dropped
        assert torch.equal(new[dropped], v[dropped])  # dropped: carried over exactly
        assert torch.equal(new[kept], torch.zeros_like(new[kept]))  # sent: nothing left behind
        torch.testing.assert_close(global_state[name][kept] - sent[kept], v[kept], rtol=0, atol=1e-6)
        if v.numel() >= 10:  # the threshold keeps the largest magnitudes
            assert v[kept].abs().min() > v[dropped].abs().max()
        kept_total += int(kept.sum())
    assert algo.kept[0] == kept_total
    assert algo.upload_bytes(model.state_dict(), 0, 0) == 8 * kept_total + 4 * BUFFERS + 8


def test_without_residual_nothing_is_carried():
    algo, *_ = one_worker({"drop_ratio": 0.8, "residual": False})
    assert algo.residuals == {}


def test_exact_threshold_drops_the_ratio():
    x = torch.randperm(1000).float()
    gen = torch.Generator().manual_seed(0)
    t = drop_threshold(x, 0.99, sample_fraction=1.0, min_sample=1, generator=gen)
    assert int((x > t).sum()) == 10
    assert drop_threshold(x, 0.0, 0.001, 100, gen) == -math.inf


def test_sampled_threshold_drops_about_the_ratio():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    [mask] = keep_mask([x], 0.99, False, sample_fraction=0.001, min_sample=1000, generator=gen)
    assert 0.003 < mask.float().mean().item() < 0.02  # a 1,000-entry sample: about 10 above the threshold


def test_layer_normalisation_selects_over_all_layers():
    gen = torch.Generator().manual_seed(0)
    big, small = torch.randn(1000) * 100, torch.randn(1000) * 0.01
    masks = keep_mask([big, small], 0.9, True, 1.0, 1, gen)
    assert 50 < int(masks[0].sum()) < 150 and 50 < int(masks[1].sum()) < 150  # each layer keeps its share
    assert int(masks[0].sum() + masks[1].sum()) == 200


def test_download_is_the_initial_model_then_the_sparse_mean_step():
    run, hist = data_parallel({"name": "graddrop", "drop_ratio": 0.9}, rounds=2)
    assert hist.extra["bytes_down"][0] == [MODEL_BYTES] * 6
    second = hist.extra["bytes_down"][1][0]
    assert (second - 4 * BUFFERS - 8) % 8 == 0 and second < MODEL_BYTES  # sparse pairs plus the buffers


def test_full_mnist_for_the_paper_scale_loads_from_idx_files(tmp_path):
    """Both communication papers' paper scale reads MNIST from data_root (checked on tiny files written here)."""
    import numpy as np
    from common.data import load_dataset, missing_files
    from common.errors import DatasetMissing
    from test_fedopt_data import write_idx
    with pytest.raises(DatasetMissing, match="t10k-labels-idx1-ubyte.*torchvision.datasets.MNIST"):
        load_dataset("mnist", data_root=tmp_path)
    raw, rng = tmp_path / "MNIST" / "raw", np.random.default_rng(0)
    for part, n in (("train", 6), ("t10k", 4)):
        write_idx(raw / f"{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(raw / f"{part}-labels-idx1-ubyte", rng.integers(0, 10, n))
    assert missing_files("mnist", tmp_path) == []
    d = load_dataset("mnist", data_root=tmp_path)
    assert (len(d.train), len(d.test), d.num_classes, d.input_shape) == (6, 4, 10, (1, 28, 28))
    assert 0 <= d.train.x.min() and d.train.x.max() <= 1
