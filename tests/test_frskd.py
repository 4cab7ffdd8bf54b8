"""FRSKD (Ji et al., CVPR 2021) and the self-distillation baselines beside it: each loss against a direct numpy
computation on hand-made tensors, the self-teacher's shapes and paths, CS-KD's same-class partners, the paper's
table and scales, and the paper-scale loaders on files the tests write."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.distill import (attention_map, attention_transfer_loss, kd_from_logits, virtual_teacher_loss,
                            virtual_teacher_probs)
from common.experiments import load_paper, resolve_cell, table_ceilings
from common.models import build_model, stage_channels, stage_maps
from papers.frskd.method import (CSKD, FRSKD, SelfTeacher, WithSelfTeacher, frskd_loss, fusion_weights,
                                 same_maxpool)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_kd(student, teacher, t):
    """T^2 * mean over samples of sum_k p_t log(p_t / p_s), both at temperature T."""
    ps, pt = softmax(student / t), softmax(teacher / t)
    return t * t * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))


def np_attention(f):
    """mean over channels of f^2 per position, flattened, divided by its L2 norm."""
    a = (f ** 2).mean(axis=1).reshape(len(f), -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# --- losses ---------------------------------------------------------------------------------------------------------
def test_attention_map_and_transfer_loss_match_direct_formula():
    rng = np.random.default_rng(0)
    fs, ft = rng.normal(size=(3, 5, 4, 4)), rng.normal(size=(3, 7, 4, 4))  # channels may differ
    a = attention_map(torch.tensor(fs)).numpy()
    np.testing.assert_allclose(a, np_attention(fs), rtol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-12)
    want = np.mean((np_attention(fs) - np_attention(ft)) ** 2)
    got = attention_transfer_loss(torch.tensor(fs), torch.tensor(ft)).item()
    assert got == pytest.approx(want, rel=1e-10)
    # a hand-made case: one channel, two positions with values (3, 4) -> squares (9, 16) -> normalised (9, 16)/sqrt(337)
    f = torch.tensor([[[[3.0, 4.0]]]], dtype=torch.float64)
    np.testing.assert_allclose(attention_map(f).numpy(), [[9 / np.sqrt(337), 16 / np.sqrt(337)]], rtol=1e-12)


def test_attention_transfer_gives_no_gradient_to_the_teacher_map():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 6, 4, 4, requires_grad=True)
    attention_transfer_loss(fs, ft).backward()
    assert ft.grad is None and fs.grad is not None and fs.grad.abs().sum() > 0


def test_soft_label_kd_matches_direct_formula_and_detaches_the_teacher():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(4, 6)) * 3, rng.normal(size=(4, 6)) * 3
    for temp in (1.0, 4.0):
        assert kd_from_logits(torch.tensor(s), torch.tensor(t), temp).item() == pytest.approx(np_kd(s, t, temp),
                                                                                              rel=1e-10)
    ts, tt = torch.tensor(s, requires_grad=True), torch.tensor(t, requires_grad=True)
    kd_from_logits(ts, tt, 4.0).backward()
    assert tt.grad is None and ts.grad is not None
    assert kd_from_logits(torch.tensor(s), torch.tensor(s), 4.0).item() == pytest.approx(0.0, abs=1e-12)


def test_virtual_teacher_loss_matches_authors_formula():
    y = torch.tensor([2, 0, 1])
    u = np.full((3, 4), 0.01 / 3)
    u[np.arange(3), y.numpy()] = 0.99
    p = softmax(u / 20.0)
    np.testing.assert_allclose(virtual_teacher_probs(y, 4, 0.99, 20.0).double().numpy(), p, rtol=1e-6)
    z = np.array([[0.5, -1.0, 2.0, 0.1], [1.5, 0.2, -0.3, 0.0], [0.0, 0.0, 3.0, -2.0]])
    log_q = np.log(softmax(z))
    ce = -np.mean(log_q[np.arange(3), y.numpy()])
    kl_mean = np.mean(p * (np.log(p) - log_q))  # KLDivLoss(reduction="mean"): over every (sample, class) entry
    want = 0.9 * ce + 0.1 * 100.0 * kl_mean
    got = virtual_teacher_loss(torch.tensor(z), y, alpha=0.1, temperature=20.0, multiplier=100.0).item()
    assert got == pytest.approx(want, rel=1e-5)


def test_frskd_loss_is_the_sum_of_its_four_terms():
    rng = np.random.default_rng(2)
    maps = [rng.normal(size=(2, 3, 4, 4)) ** 2, rng.normal(size=(2, 5, 2, 2)) ** 2]
    t_maps = [rng.normal(size=(2, 6, 4, 4)) ** 2, rng.normal(size=(2, 10, 2, 2)) ** 2]
    z, zt = rng.normal(size=(2, 5)), rng.normal(size=(2, 5))
    y = np.array([3, 1])

    def ce(logits):
        return -np.mean(np.log(softmax(logits))[np.arange(2), y])

    feature = sum(np.mean((np_attention(f) - np_attention(t)) ** 2) for f, t in zip(maps, t_maps))
    want = ce(z) + ce(zt) + 2.0 * np_kd(z, zt, 4.0) + 100.0 * feature
    got = frskd_loss(torch.tensor(z), torch.tensor(zt), [torch.tensor(m) for m in maps],
                     [torch.tensor(m) for m in t_maps], torch.tensor(y), 2.0, 100.0, 4.0).item()
    assert got == pytest.approx(want, rel=1e-10)


# --- the self-teacher -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size,width,expect", [
    ("resnet8", 28, 8, [(8, 28), (16, 14), (32, 7)]),
    ("resnet18", 32, 4, [(4, 32), (8, 16), (16, 8), (32, 4)]),
    ("resnet18", 64, 4, [(4, 64), (8, 32), (16, 16), (32, 8)]),  # Tiny-ImageNet at its native size
])
def test_stage_maps_and_self_teacher_shapes(name, size, width, expect):
    torch.manual_seed(0)
    model = build_model(name, in_channels=3, num_classes=7, input_size=size, width=width).eval()
    x = torch.randn(2, 3, size, size)
    maps, logits = stage_maps(model, x)
    assert [(m.shape[1], m.shape[2]) for m in maps] == expect
    assert stage_channels(model) == [c for c, _ in expect]
    torch.testing.assert_close(logits, model(x))  # the same forward pass as the classifier's
    teacher = SelfTeacher(stage_channels(model), 7, width=2, depth=2).eval()
    t_maps, t_logits = teacher(maps)
    assert [tuple(t.shape) for t in t_maps] == [(2, 2 * c, s, s) for c, s in expect]  # width 2 x the channels
    assert t_logits.shape == (2, 7)
    assert all((t >= 0).all() for t in t_maps)  # refined maps leave through a ReLU


def test_self_teacher_paths_connect_every_level():
    """Top-down and bottom-up: every refined map depends on every classifier map (the finest through the top-down
    path, the coarsest through the bottom-up path)."""
    torch.manual_seed(0)
    teacher = SelfTeacher([3, 5, 7], 4, width=2, depth=2).eval()
    maps = [torch.rand(1, 3, 8, 8, requires_grad=True), torch.rand(1, 5, 4, 4, requires_grad=True),
            torch.rand(1, 7, 2, 2, requires_grad=True)]
    t_maps, _ = teacher(maps)
    for t in t_maps:
        grads = torch.autograd.grad(t.sum(), maps, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # two lateral paths at every level but the finest, 2 fusion weights top-down, 3 bottom-up (2 at the top)
    assert len(teacher.lateral) == 3 and len(teacher.lateral_up) == 2
    assert [len(w) for w in teacher.up_weight] == [2, 2] and [len(w) for w in teacher.down_weight] == [3, 2]


def test_fusion_weights_and_same_maxpool():
    w = fusion_weights(torch.tensor([1.0, -2.0, 3.0]))
    np.testing.assert_allclose(w.numpy(), [1 / (4 + 1e-6), 0.0, 3 / (4 + 1e-6)], rtol=1e-6)
    for h in (28, 14, 7, 8):
        assert same_maxpool(torch.rand(1, 1, h, h)).shape[-1] == -(-h // 2)
    x = torch.arange(16.0).view(1, 1, 4, 4)
    np.testing.assert_array_equal(same_maxpool(x)[0, 0].numpy(), [[10, 11], [14, 15]])  # windows rows/cols 0-2 and 2-3 (+ one padded)


def test_frskd_keeps_the_classifiers_initialisation():
    """FRSKD's classifier starts from the run's initialisation (paired by seed with the baseline); the self-teacher
    draws from a seed of its own."""
    from types import SimpleNamespace

    from common.data import load_dataset
    ds = load_dataset("digits5", train_limit=100, test_limit=50)
    torch.manual_seed(5)
    base = build_model("resnet8", in_channels=3, num_classes=10, input_size=28, width=4)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    ctx = SimpleNamespace(model=base, spec={"seed": 5}, data=ds, device=torch.device("cpu"),
                          parts=[torch.arange(100)])
    algo = FRSKD()
    algo.setup(ctx)
    assert isinstance(ctx.model, WithSelfTeacher)
    for k, v in ctx.model.classifier.state_dict().items():
        torch.testing.assert_close(v, ref[k])
    names = {n for n, _ in ctx.model.named_parameters()}
    assert any(n.startswith("teacher.") for n in names) and any(n.startswith("classifier.") for n in names)
    x = ds.train.x[:4]
    torch.testing.assert_close(ctx.model(x), ctx.model.classifier(x))  # evaluation sees the classifier alone


# --- CS-KD ----------------------------------------------------------------------------------------------------------
def test_cs_kd_partners_share_the_class_and_cover_it():
    from types import SimpleNamespace

    y_all = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
    ctx = SimpleNamespace(parts=[torch.arange(10)], device=torch.device("cpu"),
                          data=SimpleNamespace(train=SimpleNamespace(y=y_all), num_classes=3))
    ctx.model = torch.nn.Linear(2, 3)
    ctx.data.num_classes = 3
    algo = CSKD()
    algo.setup(ctx)
    algo.gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2] * 200)
    p = algo.partners(y)
    assert torch.equal(y_all[p], y)
    for c in range(3):
        assert set(p[y == c].tolist()) == set(torch.nonzero(y_all == c).flatten().tolist())


def test_cs_kd_loss_is_ce_plus_class_wise_kd():
    """CS-KD's objective: CE of the batch + lamda * T^2 KL(p(x') || p(x)) with the partner's logits as target."""
    rng = np.random.default_rng(3)
    z, zp = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    y = np.array([0, 3, 1, 1, 2])
    ce = -np.mean(np.log(softmax(z))[np.arange(5), y])
    want = ce + 1.0 * np_kd(z, zp, 4.0)
    got = F.cross_entropy(torch.tensor(z), torch.tensor(y)) + kd_from_logits(torch.tensor(z), torch.tensor(zp), 4.0)
    assert got.item() == pytest.approx(want, rel=1e-10)


# --- runs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", [{"name": "frskd"}, {"name": "cs_kd"}, {"name": "tf_kd_reg"}])
def test_methods_train_deterministically(method):
    from common.train import execute
    spec = {"dataset": {"name": "digits5", "train_limit": 200, "test_limit": 100},
            "partition": {"scheme": "iid", "clients": 1}, "model": {"name": "resnet8", "norm": "bn", "width": 4},
            "training": {"rounds": 2, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                         "momentum": 0.9, "keep_optimizer": True}, "method": method, "seed": 1}
    a, b = execute(spec, "data", "cpu", 1, progress=False), execute(spec, "data", "cpu", 1, progress=False)
    assert a["status"] == "completed" and a["metrics"]["test_accuracy"] == b["metrics"]["test_accuracy"]
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]
    if method["name"] == "frskd":
        assert a["metrics"]["teacher_accuracy"][0] is None and 0 <= a["metrics"]["teacher_accuracy"][-1] <= 1
        plain = build_model("resnet8", in_channels=3, num_classes=10, input_size=28, width=4)
        assert a["model"]["parameters"] > sum(p.numel() for p in plain.parameters())  # the self-teacher trains too


# --- the paper's table and scales -------------------------------------------------------------------------------------
def test_table7_values_and_scales():
    paper = load_paper("frskd")
    t = paper["tables"]["table7"]
    rows = [r["label"] for r in t["rows"]]
    assert rows[0] == "Baseline" and rows[-1] == "FRSKD"
    assert t["paper"][0][0] == "73.80±0.60" and t["paper"][-1] == [
        "77.71±0.14", "59.61±0.31", "65.39±0.13", "61.74±0.67", "70.77±0.20", "56.00±1.19"]
    mini = resolve_cell(paper, "table7", rows.index("FRSKD"), 0, "mini")
    assert len(mini.specs) == 3 and mini.specs[0]["method"] == {"name": "frskd", "alpha": 2.0, "beta": 100.0,
                                                                  "temperature": 4.0, "width": 2, "depth": 2}
    assert resolve_cell(paper, "table7", rows.index("ATT"), 0, "mini").specs == ()  # no teacher at any scale
    assert resolve_cell(paper, "table7", rows.index("FRSKD"), 1, "mini").specs == ()  # no TinyImageNet analog
    paper_cell = resolve_cell(paper, "table7", rows.index("FRSKD"), 1, "paper")
    assert paper_cell.specs[0]["dataset"]["name"] == "tinyimagenet" and paper_cell.specs[0]["model"]["name"] == "resnet18"
    (ceiling,) = table_ceilings(paper, "table7", "mini")
    assert ceiling.specs[0]["method"] == {"name": "centralised"} and ceiling.specs[0]["model"]["width"] == 16
    assert ceiling.specs[0]["training"] == mini.specs[0]["training"]


def test_paper_scale_loaders_on_written_files(tmp_path, monkeypatch):
    """CIFAR-100 and Tiny-ImageNet (the paper scale's datasets) load from files the test writes, and FRSKD's
    classifier and self-teacher run on them."""
    from common.data import load_dataset
    from tests.test_data import write_fake_cifar100
    from tests.test_image_folder_data import write_fake_tinyimagenet
    monkeypatch.setenv("PAPERBENCH_CACHE", str(tmp_path / "cache"))
    write_fake_cifar100(tmp_path / "data", monkeypatch)
    write_fake_tinyimagenet(tmp_path / "data")
    for name, size in (("cifar100", 32), ("tinyimagenet", 64)):  # the fake Tiny-ImageNet has a few classes
        ds = load_dataset(name, data_root=tmp_path / "data")
        classes = ds.num_classes
        assert ds.train.x.shape[1:] == (3, size, size) and classes == (100 if name == "cifar100" else 3)
        torch.manual_seed(0)
        model = build_model("resnet18", in_channels=3, num_classes=classes, input_size=size, width=4)
        net = WithSelfTeacher(model, SelfTeacher(stage_channels(model), classes))
        maps, logits, t_maps, t_logits = net.both(ds.train.x[:2])
        loss = frskd_loss(logits, t_logits, maps, t_maps, ds.train.y[:2], 2.0, 100.0, 4.0)
        assert torch.isfinite(loss) and t_logits.shape == (2, classes)
