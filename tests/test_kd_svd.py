"""KD-SVD (Lee, Kim, Song, ECCV 2018) and KD-EID (Lee, Song, TNNLS): the decomposition, the alignment of the
student's singular vectors, the radial-basis correlation, the FSP matrix and the whole loss against numpy; the
clipped distillation gradient; the teacher shared with the Teacher row and the student with the Student row; the
paper-scale networks on CIFAR-100 files the test writes."""
import numpy as np
import pytest
import torch

from common.distill import (align_singular_vectors, fsp_loss, fsp_matrix, kd_svd_loss, rbf_correlation,
                            truncated_decomposition)
from common.errors import SuiteError
from common.models import stage_maps


def np_top_v(x: np.ndarray, k: int):
    """numpy reference: top-k right singular vectors (C, k) and singular values normalised over the k."""
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    v = vt[:k].T
    return s[:k] / np.linalg.norm(s[:k]), v * np.where(v.sum(0) < 0, -1.0, 1.0)  # the sign convention: sum >= 0


def same_up_to_sign(a: np.ndarray, b: np.ndarray, atol=1e-8) -> bool:
    signs = np.sign((a * b).sum(0))
    return np.allclose(a, b * signs, atol=atol)


def features(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64))


# --- the decomposition ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["svd", "eid"])
@pytest.mark.parametrize("shape", [(3, 6, 20), (3, 6, 7), (3, 8, 3), (2, 4, 2, 3)])  # |S| > C, ≈ C, < C; a 2-D map
def test_truncated_decomposition_matches_numpy_svd(method, shape):
    fm = features(shape, 0)
    k = 3
    s, v = truncated_decomposition(fm, k, method)
    for b in range(shape[0]):
        x = fm[b].reshape(shape[1], -1).T.numpy()  # rows: positions, columns: channels
        s_ref, v_ref = np_top_v(x, min(k, *x.shape))
        assert np.allclose(s[b].numpy(), s_ref, atol=1e-8)
        assert np.allclose(v[b].numpy(), v_ref, atol=1e-8)  # the same signs (entries summing to >= 0)
        assert same_up_to_sign(v[b].numpy(), np.linalg.svd(x)[2][:v_ref.shape[1]].T)


def test_eid_uses_the_eigen_decomposition_only_far_from_square(monkeypatch):
    calls = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: calls.append(a.shape) or real(a))
    truncated_decomposition(features((2, 6, 7), 1), 2, "eid")  # 7 positions / 6 channels: within (2/3, 3/2)
    assert calls == []
    truncated_decomposition(features((2, 6, 20), 1), 2, "eid")  # X^T X, 6 x 6
    truncated_decomposition(features((2, 8, 3), 1), 2, "eid")  # X X^T, 3 x 3
    assert calls == [(2, 6, 6), (2, 3, 3)]


# --- alignment, correlation, FSP ---------------------------------------------------------------------------------
def test_alignment_picks_the_most_similar_student_vector_and_its_sign():
    g = torch.Generator().manual_seed(2)
    vs = torch.nn.functional.normalize(torch.randn(2, 5, 4, generator=g, dtype=torch.float64), dim=1)
    vt = torch.nn.functional.normalize(torch.randn(2, 5, 2, generator=g, dtype=torch.float64), dim=1)
    got = align_singular_vectors(vs, vt).numpy()
    for b in range(2):
        for j in range(2):
            cos = [float(vs[b, :, i] @ vt[b, :, j]) for i in range(4)]
            i = int(np.argmax(np.abs(cos)))
            assert np.allclose(got[b, :, j], np.sign(cos[i]) * vs[b, :, i].numpy())
            assert float(got[b, :, j] @ vt[b, :, j].numpy()) >= 0
    # a student vector equal to minus the teacher's is flipped back onto it
    assert torch.allclose(align_singular_vectors(-vt, vt), vt)


def test_rbf_correlation_against_direct_loops():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 2, generator=g, dtype=torch.float64), torch.randn(2, 4, 2, generator=g, dtype=torch.float64)
    got = rbf_correlation(a, b, 8.0).numpy()
    assert got.shape == (2, 3, 4, 2)
    for n in range(2):
        for c in range(3):
            for d in range(4):
                for i in range(2):
                    assert got[n, c, d, i] == pytest.approx(np.exp(-(a[n, c, i] - b[n, d, i]).item() ** 2 / 8.0))


def test_fsp_matrix_against_a_direct_computation():
    top, bottom = features((2, 3, 8), 4), features((2, 5, 4), 5)  # the top map is twice as long: max-pooled by 2
    got = fsp_matrix(top, bottom).numpy()
    pooled = top.numpy().reshape(2, 3, 4, 2).max(-1)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                assert got[n, i, j] == pytest.approx(sum(pooled[n, i, s] * bottom[n, j, s].item() for s in range(4)) / 4)
    # 2-D maps of the same size: plain average over positions
    t2, b2 = features((1, 2, 3, 3), 6), features((1, 4, 3, 3), 7)
    direct = np.einsum("ihw,jhw->ij", t2[0].numpy(), b2[0].numpy()) / 9
    assert np.allclose(fsp_matrix(t2, b2)[0].numpy(), direct)
    # the loss: per pair of points, the batch mean of ||G_T - G_S||^2 / 2
    s_feats, t_feats = [features((2, 3, 8), 8), features((2, 5, 4), 9)], [features((2, 3, 8), 10), features((2, 5, 4), 11)]
    diff = fsp_matrix(*t_feats).numpy() - fsp_matrix(*s_feats).numpy()
    assert fsp_loss(s_feats, t_feats).item() == pytest.approx(np.mean((diff ** 2).sum((1, 2)) / 2))


def np_kd_svd_loss(student, teacher, k, ks, bandwidth=8.0):
    """numpy re-implementation of the KD-SVD loss of the authors' benchmark code (nets/Shared.py, nets/SVP.py)."""
    total, prev = 0.0, None
    for sf, tf_ in zip(student, teacher):
        layer_s, layer_t = [], []
        for b in range(sf.shape[0]):
            s_t, v_t = np_top_v(tf_[b].reshape(tf_.shape[1], -1).T, k)
            _, v_s = np_top_v(sf[b].reshape(sf.shape[1], -1).T, ks)
            aligned = np.zeros_like(v_t)
            for j in range(v_t.shape[1]):
                cos = v_s.T @ v_t[:, j]
                i = np.argmax(np.abs(cos))
                aligned[:, j] = np.sign(cos[i]) * v_s[:, i]
            layer_s.append(aligned * s_t)
            layer_t.append(v_t * s_t)
        if prev is not None:
            for b in range(sf.shape[0]):
                rs = np.exp(-(layer_s[b][:, None, :] - prev[0][b][None, :, :]) ** 2 / bandwidth)
                rt = np.exp(-(layer_t[b][:, None, :] - prev[1][b][None, :, :]) ** 2 / bandwidth)
                total += ((rs - rt) ** 2).sum()
        prev = (layer_s, layer_t)
    return total


@pytest.mark.parametrize("k,ks", [(1, 4), (2, 3)])
def test_kd_svd_loss_against_numpy(k, ks):
    # maps of full rank (no zero singular value, whose vector is arbitrary in an SVD and zero in the EID)
    student = [features((2, 6, 12), 20) + 0.1, features((2, 6, 6), 21) + 0.1, features((2, 6, 3), 22) + 0.1]
    teacher = [features((2, 6, 12), 23) + 0.1, features((2, 6, 6), 24) + 0.1, features((2, 6, 3), 25) + 0.1]
    ref = np_kd_svd_loss([x.numpy() for x in student], [x.numpy() for x in teacher], k, ks)
    got = kd_svd_loss(student, teacher, k, ks, "svd")
    assert got.item() == pytest.approx(ref, rel=1e-8)
    assert kd_svd_loss(student, teacher, k, ks, "eid").item() == pytest.approx(ref, rel=1e-6)  # same vectors
    assert kd_svd_loss(teacher, teacher, k, ks).item() == pytest.approx(0.0, abs=1e-12)  # the teacher itself: 0


def test_kd_svd_loss_gradient_is_finite_and_channels_must_match():
    student = [features((2, 4, 8), 60).requires_grad_(), features((2, 4, 4), 61).requires_grad_()]
    teacher = [features((2, 4, 8), 62), features((2, 4, 4), 63)]
    for method in ("svd", "eid"):
        loss = kd_svd_loss(student, teacher, 1, 4, method)
        grads = torch.autograd.grad(loss, student)
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="channels"):
        kd_svd_loss([features((2, 3, 8), 1)], [features((2, 4, 8), 2)])


def test_clipped_gradient_against_a_direct_computation():
    from papers.kd_svd.method import clipped_gradient_loss
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    out = model(x)
    task, dist = out[:, 0].pow(2).mean(), 50 * out[:, 1].sum()
    params = list(model.parameters())
    g_task = torch.autograd.grad(task, params, retain_graph=True)
    g_dist = torch.autograd.grad(dist, params, retain_graph=True)
    loss = clipped_gradient_loss(model, task, dist, 0.5)
    assert loss.item() == pytest.approx((task + dist).item())
    got = torch.autograd.grad(loss, params)
    for g, gt, gd in zip(got, g_task, g_dist):
        limit = 0.5 * gt.norm().item()
        clipped = gd * min(1.0, limit / gd.norm().item())
        assert torch.allclose(g, gt + clipped)


# --- the networks and their feature points ----------------------------------------------------------------------
def test_stage_maps_of_the_teacher_and_student_networks():
    from common.models import build_model
    x = torch.randn(2, 1, 40)
    for blocks in (1, 3):
        m = build_model("cnn1d", in_channels=1, num_classes=10, input_size=40, channels=[8, 8, 8], blocks=blocks)
        feats, logits = stage_maps(m, x)
        assert torch.allclose(logits, m(x)) and [tuple(f.shape) for f in feats] == [(2, 8, 20), (2, 8, 10), (2, 8, 5)]
    for name in ("resnet8", "resnet32"):
        m = build_model(name, in_channels=3, num_classes=100, input_size=32, width=16).eval()
        feats, logits = stage_maps(m, torch.randn(2, 3, 32, 32))
        assert [tuple(f.shape[1:]) for f in feats] == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]
    with pytest.raises(SuiteError, match="stage"):
        stage_maps(build_model("mlp", in_channels=1, num_classes=10, input_size=8), torch.randn(2, 1, 8, 8))


def test_paper_scale_data_and_networks_on_written_cifar100_files(tmp_path, monkeypatch):
    from tests.test_data import write_fake_cifar100
    from common.data import load_dataset
    from common.models import build_model
    write_fake_cifar100(tmp_path, monkeypatch, n_train=6, n_test=4)
    data = load_dataset("cifar100", tmp_path)
    assert tuple(data.train.x.shape) == (6, 3, 32, 32) and data.num_classes == 100
    student = build_model("resnet8", in_channels=3, num_classes=100, input_size=32, width=64).eval()
    teacher = build_model("resnet32", in_channels=3, num_classes=100, input_size=32, width=64).eval()
    fs, _ = stage_maps(student, data.train.x)
    ft, _ = stage_maps(teacher, data.train.x)
    assert [f.shape for f in fs] == [f.shape for f in ft]
    assert torch.isfinite(kd_svd_loss(fs, ft)) and torch.isfinite(fsp_loss(fs, ft))


# --- the method in runs --------------------------------------------------------------------------------------------
def tiny_spec(method, rounds=4, seed=0):
    return {"dataset": {"name": "mnist1d", "train_limit": 200, "test_limit": 100},
            "partition": {"scheme": "iid", "clients": 1},
            "model": {"name": "cnn1d", "channels": [4, 4, 4]},
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                         "momentum": 0.9, "weight_decay": 5e-4, "lr_decay": 0.9, "keep_optimizer": True},
            "method": method, "seed": seed}


TEACHER = {"name": "cnn1d", "channels": [4, 4, 4], "blocks": 2}


def test_the_teacher_is_the_teacher_rows_and_the_student_the_student_rows():
    from common.train import execute
    teacher = execute(tiny_spec({"name": "kd_svd", "distill": "none", "teacher_model": TEACHER, "teacher_rounds": 2},
                                rounds=2), progress=False)
    student = execute(tiny_spec({"name": "centralised"}, rounds=2), progress=False)
    # no distillation after the teacher: the student's rounds are the Student row's run, bit for bit
    plain = execute(tiny_spec({"name": "kd_svd", "distill": "none", "teacher_model": TEACHER, "teacher_rounds": 2}),
                    progress=False)
    assert plain["metrics"]["test_accuracy"] == teacher["metrics"]["test_accuracy"] + student["metrics"]["test_accuracy"]
    assert plain["metrics"]["phase"] == ["teacher", "teacher", "student", "student"]
    for distill in ("kd", "svd", "eid"):
        r = execute(tiny_spec({"name": "kd_svd", "distill": distill, "teacher_model": TEACHER, "teacher_rounds": 2}),
                    progress=False)
        assert r["metrics"]["test_accuracy"][:2] == teacher["metrics"]["test_accuracy"]
        assert r["metrics"]["teacher_accuracy"][-1] == teacher["final"]["test_accuracy"]
        assert r["model"]["parameters"] == student["model"]["parameters"]  # the run's model is the student
    fsp = execute(tiny_spec({"name": "kd_svd", "distill": "fsp", "teacher_model": TEACHER, "teacher_rounds": 2,
                             "init_rounds": 1}, rounds=5), progress=False)
    assert fsp["metrics"]["phase"] == ["teacher", "teacher", "init", "student", "student"]


def test_bad_parameters_are_clear_errors():
    from common.fl import get_algorithm
    from common.train import execute
    with pytest.raises(SuiteError, match="distill"):
        get_algorithm({"name": "kd_svd", "distill": "pca"})
    with pytest.raises(SuiteError, match="teacher_model"):
        get_algorithm({"name": "kd_svd", "distill": "svd", "teacher_rounds": 2})
    with pytest.raises(SuiteError, match="init_rounds"):
        get_algorithm({"name": "kd_svd", "distill": "svd", "teacher_model": TEACHER, "teacher_rounds": 2,
                       "init_rounds": 2})
    with pytest.raises(SuiteError, match="student round"):
        execute(tiny_spec({"name": "kd_svd", "distill": "svd", "teacher_model": TEACHER, "teacher_rounds": 4}),
                progress=False)


def test_the_ceiling_is_the_teacher_row():
    from common.experiments import load_paper, paper_runs, table_cells, table_ceilings
    paper = load_paper("kd_svd")
    (ceiling,) = table_ceilings(paper, "cifar100", "mini")
    cells = table_cells(paper, "cifar100", "mini")
    assert ceiling.run_ids == cells[0][3].run_ids  # the Teacher row's runs: no further run
    assert ceiling.cells == tuple((r, 3) for r in range(1, 6))
    runs = paper_runs("kd_svd", "mini")
    assert len(runs) == 6 * 3  # six rows, three seeds, one column with an analog
    kd = [s for s in runs.values() if s["method"].get("distill") == "svd"][0]
    assert kd["training"]["rounds"] == kd["method"]["teacher_rounds"] + 30
