"""FedReID: retrieval metrics on a hand-made gallery, cosine distance weights against a direct computation, local
identity classifiers (never averaged, never sent), the server's distillation target, the generated data and the
paper-scale loader of the ReID layouts on small files written here."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import load_dataset, missing_files
from common.data.reid import load_reid, parse_name
from common.distill import ensemble_features
from common.errors import DatasetMissing
from common.fl import get_algorithm
from common.fl.engine import FederatedRun, RunContext, clone_state
from common.report.metrics import domain_accuracy, logged
from common.retrieval import retrieval_metrics
from common.train import load_data_and_partition, model_factory

SMOKE = {"dataset": {"name": "reid_synth_smoke"}, "partition": {"scheme": "domain", "clients": 6},
         "model": {"name": "cnn", "channels": [4, 8], "hidden": [16], "norm": "bn"},
         "training": {"rounds": 2, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
                      "momentum": 0.9, "weight_decay": 5e-4}, "seed": 0}


# --- retrieval metrics ------------------------------------------------------------------------------------------
def test_rank1_and_map_on_a_hand_made_gallery():
    """Features on the unit circle at known angles, so each query's ranking is known by hand."""
    ang = lambda deg: [math.cos(math.radians(deg)), math.sin(math.radians(deg))]  # noqa: E731
    # gallery: (angle, identity, camera)
    gallery = [(10, 1, 2), (20, 2, 2), (30, 1, 3), (40, 3, 2), (50, 2, 3), (5, 1, 1), (60, -1, 2)]
    gf = torch.tensor([ang(a) for a, _, _ in gallery])
    gid = np.array([i for _, i, _ in gallery])
    gcam = np.array([c for _, _, c in gallery])
    # query 1: identity 1, camera 1, at 0 degrees. Ranking of kept images (the camera-1 image of identity 1 and the
    # junk identity -1 left out) by angle: 10 (id 1, match), 20 (2), 30 (id 1, match), 40 (3), 50 (2)
    # -> rank-1 hit, AP = (1/1 + 2/3) / 2
    # query 2: identity 2, camera 2, at 45 degrees: kept 10 (1), 30 (1), 40 (3), 50 (2, match), 5 (1);
    # (20: identity 2 in camera 2 is junk). Ranked by distance to 45: 40, 50, 30, 10, 5 -> match at rank 2:
    # rank-1 miss, AP = 1/2
    qf = torch.tensor([ang(0), ang(45)])
    m = retrieval_metrics(qf, [1, 2], [1, 2], gf, gid, gcam)
    assert m["queries"] == 2
    assert m["hit"] == [1.0, 0.0]
    assert m["ap"] == pytest.approx([(1 + 2 / 3) / 2, 0.5])
    assert m["rank1"] == pytest.approx(0.5)
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 2 + 0.5) / 2)


def test_a_query_without_a_match_in_another_camera_is_skipped_and_features_need_no_normalising():
    gf = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    m = retrieval_metrics(torch.tensor([[5.0, 0.1], [0.0, 2.0]]), [7, 8], [1, 1], gf, [7, 8], [1, 2])
    assert m["queries"] == 1 and m["rank1"] == 1.0 and m["map"] == 1.0  # query 7's only match is its own camera


# --- generated data -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["reid_synth_smoke", "reid_synth"])
def test_generated_identities_are_disjoint_across_datasets_and_test_identities_unseen(name):
    ds = load_dataset(name)
    owners = {}
    for d in range(len(ds.domains)):
        for i in ds.train.y[ds.train.domain == d].unique().tolist():
            assert owners.setdefault(i, d) == d
    assert len(owners) == ds.num_classes
    assert ds.extra["train_ids"] == [int((ds.train.y[ds.train.domain == d]).unique().numel())
                                     for d in range(len(ds.domains))]
    q, cams = ds.extra["test_query"], ds.extra["test_camera"]
    for d in range(len(ds.domains)):  # every query has a gallery image of its identity in another camera
        sel = ds.test.domain == d
        assert q[sel].any() and (~q[sel]).any()
        for i in (ds.test.y[sel & q]).unique():
            assert ((ds.test.y == i) & sel & ~q & (cams != 0)).any()
    assert ds.extra["public_x"].shape[1:] == ds.train.x.shape[1:]
    if name == "reid_synth":
        sizes = [int((ds.train.domain == d).sum()) for d in range(len(ds.domains))]
        assert max(sizes) >= 20 * min(sizes)  # clients of very different sizes


# --- FedPav -------------------------------------------------------------------------------------------------------
def make_run(method: dict, rounds: int = 2):
    spec = {**SMOKE, "method": method, "training": {**SMOKE["training"], "rounds": rounds}}
    torch.manual_seed(0)
    data, parts = load_data_and_partition(spec, "data")
    make_model = model_factory(spec, data, torch.device("cpu"))
    ctx = RunContext(spec=spec, data=data, parts=parts, model=make_model(), make_model=make_model,
                     device=torch.device("cpu"), data_root="data")
    return FederatedRun(ctx, get_algorithm(method)), ctx


def test_identity_classifiers_are_never_averaged_nor_sent():
    run, ctx = make_run({"name": "fedpav", "kd": True, "cdw": True})
    initial = clone_state(ctx.model)
    run.train(progress=False)
    algo = run.algo
    head = {"head.weight", "head.bias"}
    assert set(algo.local_keys) == head
    for k in head:  # the server's copy of the head is never touched; the clients' heads are their own
        assert torch.equal(run.final_state[k], initial[k])
        assert not torch.equal(algo.local[0][k], algo.local[1][k])
    assert not torch.equal(run.final_state["features.0.weight"], initial["features.0.weight"])
    assert not set(algo.transmitted_keys(initial)) & head
    up = ctx.history.extra["bytes_up"][0][0]
    assert up == sum(v.numel() * v.element_size() for k, v in initial.items() if k not in head)


def test_server_average_weights_backbones_by_cosine_distance_and_keeps_the_head():
    run, ctx = make_run({"name": "fedpav", "cdw": True})
    algo = run.algo
    algo.setup(ctx)
    from common.fl.engine import History
    ctx.history = History()
    g = clone_state(ctx.model)
    states = []
    for k in range(3):
        torch.manual_seed(10 + k)
        states.append({n: torch.randn_like(v) if v.is_floating_point() else v.clone() for n, v in g.items()})
    algo.round_clients = [0, 2, 4]
    algo.cdw_distance = {0: 0.1, 2: 0.3, 4: 0.6, 5: 9.0}
    new = algo.server_update(g, states, [100, 1, 1], 0)
    w = np.array([0.1, 0.3, 0.6]) / (0.1 + 0.3 + 0.6)  # client 5 did not train this round
    for n in ("features.0.weight", "features.4.bias"):
        expect = sum(wi * s[n].double().numpy() for wi, s in zip(w, states))
        np.testing.assert_allclose(new[n].numpy(), expect, rtol=1e-5, atol=1e-6)
    assert torch.equal(new["head.weight"], g["head.weight"])
    assert ctx.history.extra["cdw_weights"] == [pytest.approx(list(w))]


def test_cosine_distance_is_one_minus_cosine_of_outputs_before_and_after_on_own_identities():
    run, ctx = make_run({"name": "fedpav", "cdw": True})
    algo = run.algo
    algo.setup(ctx)
    client = 1
    model = ctx.model
    algo.clients_of_round(run, 0)
    algo.begin_client(model, clone_state(model), client)
    before = clone_state(model)
    run.local_train(client, 0)
    x = algo.cdw_batch(client)
    algo.end_client(model, before, client, 1)
    own = torch.unique(ctx.data.train.y[ctx.parts[client]]).numpy()
    ref = ctx.make_model()
    ref.load_state_dict(before)
    ref.eval()
    model.eval()
    with torch.no_grad():
        a, b = ref(x).numpy()[:, own], model(x).numpy()[:, own]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert algo.cdw_distance[client] == pytest.approx(float(np.mean(1 - cos)), rel=1e-5)
    assert 0 < algo.cdw_distance[client] < 2
    assert len(x) == min(32, len(ctx.parts[client]))  # a batch of the client's own training data


def test_local_loss_is_cross_entropy_over_the_clients_own_identities():
    run, ctx = make_run({"name": "reid_local"})
    algo = run.algo
    algo.setup(ctx)
    client = 2
    algo.begin_client(ctx.model, clone_state(ctx.model), client)
    idx = ctx.parts[client]
    x, y = ctx.data.train.x[idx], ctx.data.train.y[idx]
    own = torch.unique(y)
    logits = ctx.model(x).detach().numpy()[:, own.numpy()]
    target = np.searchsorted(own.numpy(), y.numpy())
    z = logits - logits.max(1, keepdims=True)
    ce = -(z[np.arange(len(y)), target] - np.log(np.exp(z).sum(1))).mean()
    assert algo.local_loss(ctx.model, x, y).item() == pytest.approx(float(ce), rel=1e-5)


def test_ceiling_loss_is_cross_entropy_over_each_images_own_dataset_identities():
    """The pooled ceiling (`reid_centralised`): one client holding every dataset, each image's softmax over the
    identities of its own dataset only."""
    run, ctx = make_run({"name": "reid_centralised"})
    algo = run.algo
    algo.setup(ctx)
    assert len(ctx.parts) == 1 and len(ctx.parts[0]) == len(ctx.data.train.y)  # the pooled data
    x, y, dom = ctx.data.train.x, ctx.data.train.y.numpy(), ctx.data.train.domain.numpy()
    logits = ctx.model(x).detach().numpy()
    ce = []
    for i in range(len(y)):
        own = np.unique(y[dom == dom[i]])  # the identities of the image's dataset
        z = logits[i, own] - logits[i, own].max()
        ce.append(-(z[np.searchsorted(own, y[i])] - np.log(np.exp(z).sum())))
    assert algo.local_loss(ctx.model, x, ctx.data.train.y).item() == pytest.approx(float(np.mean(ce)), rel=1e-5)


def test_mini_ceiling_is_the_pooled_model_with_per_dataset_classifiers_and_a_decayed_learning_rate():
    from common.experiments import load_paper, table_ceilings
    paper = load_paper("fedreid")
    for table in ("rank1", "mean"):
        for ceiling in table_ceilings(paper, table, "mini"):
            for spec in ceiling.specs:
                assert spec["method"] == {"name": "reid_centralised"}
                assert spec["partition"] == {"scheme": "domain", "clients": 6}
                assert spec["training"]["rounds"] == 25 and spec["training"]["lr_decay"] == 0.9


def test_distillation_target_is_the_mean_of_normalised_client_features():
    f = [torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([[0.0, 2.0], [0.0, -5.0]])]
    np.testing.assert_allclose(ensemble_features(f).numpy(), [[0.3, 0.9], [0.5, -0.5]], rtol=1e-6)
    np.testing.assert_allclose(ensemble_features(f, normalise=False).numpy(), [[1.5, 3.0], [0.5, -2.5]])


def test_distillation_changes_only_the_backbone_and_logs_its_loss():
    run, ctx = make_run({"name": "fedpav", "kd": True, "kd_every": 2}, rounds=2)
    run.train(progress=False)
    assert ctx.history.extra["kd_loss"][0] is None and ctx.history.extra["kd_loss"][1] > 0


# --- metrics of the tables ------------------------------------------------------------------------------------------
def test_table_metrics_mean_of_last_rounds_and_oscillation():
    result = {"metrics": {"test_accuracy": [0.1, 0.5, 0.3, 0.7],
                          "domain_accuracy": [{"a": 0.1}, {"a": 0.2}, {"a": 0.4}, {"a": 0.6}],
                          "domain_map": [{"a": 0.0}, {"a": 0.2}, {"a": 0.4}, {"a": 0.9}]}}
    assert domain_accuracy(result, "a")[0] == pytest.approx(60.0)
    assert domain_accuracy(result, "a", last_rounds=2)[0] == pytest.approx(50.0)
    assert logged(result, "test_accuracy", reduce="std", last_rounds=3, scale=100)[0] == \
        pytest.approx(100 * np.std([0.5, 0.3, 0.7], ddof=1))
    assert logged(result, "domain_map", entry="a", last_rounds=2, scale=100)[0] == pytest.approx(65.0)


# --- paper-scale loader ---------------------------------------------------------------------------------------------
def _image(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 32), colour).save(path)


def test_file_names_of_the_common_layouts_are_parsed(tmp_path):
    from pathlib import Path
    assert parse_name(Path("0001_c1s1_000151_00.jpg")) == (1, 1)  # Market-1501
    assert parse_name(Path("0005_c2_f0046182.jpg")) == (5, 2)  # DukeMTMC-reID
    assert parse_name(Path("-1_c3s2_000001_00.jpg")) == (-1, 3)  # Market-1501 junk
    assert parse_name(Path("0010_c2_3.png")) == (10, 2)  # CUHK03-NP
    assert parse_name(Path("img_c4_x.jpg"), "0042") == (42, 4)  # the authors' layout: identity from the folder
    assert parse_name(Path("frame.png"), "0007") == (7, 0)


def test_reid_loader_reads_both_layouts_from_small_files(tmp_path):
    root = tmp_path
    # Market-1501's layout for "Market"
    m = root / "reid" / "Market"
    for pid, cam in [(1, 1), (1, 2), (2, 1), (-1, 1)]:
        _image(m / "bounding_box_train" / f"{pid:04d}_c{cam}s1_000151_00.jpg", (200, 0, 0))
    _image(m / "query" / "0003_c1s1_000001_00.jpg", (0, 200, 0))
    for pid, cam in [(3, 2), (4, 1), (0, 2)]:
        _image(m / "bounding_box_test" / f"{pid:04d}_c{cam}s1_000002_00.jpg", (0, 0, 200))
    # the authors' layout for "viper" and the public set
    v = root / "reid" / "viper" / "pytorch"
    _image(v / "train_all" / "0100" / "0100_c1_a.png", (10, 10, 10))
    _image(v / "train_all" / "0101" / "0101_c2_b.png", (20, 20, 20))
    _image(v / "query" / "0200" / "0200_c1_a.png", (30, 30, 30))
    _image(v / "gallery" / "0200" / "0200_c2_b.png", (40, 40, 40))
    _image(root / "reid" / "cuhk02" / "pytorch" / "train_all" / "0001" / "0001_c1_x.png", (50, 50, 50))
    _image(root / "reid" / "cuhk02" / "pytorch" / "query" / "0001" / "0001_c1_y.png", (50, 50, 50))
    _image(root / "reid" / "cuhk02" / "pytorch" / "gallery" / "0001" / "0001_c2_z.png", (50, 50, 50))
    ds = load_reid(root, {"market": "Market", "viper": "viper"}, size=(32, 16))
    assert ds.domains == ("market", "viper")
    assert ds.train.x.shape == (5, 3, 32, 16)  # the junk (-1) training image left out
    assert ds.train.y.tolist() == [0, 0, 1, 2, 3] and ds.train.domain.tolist() == [0, 0, 0, 1, 1]
    assert ds.num_classes == 4 and ds.extra["train_ids"] == [2, 2]
    assert ds.test.y.tolist() == [3, 0, 3, 4, 200, 200]  # query first, then the gallery (sorted by name)
    assert ds.extra["test_query"].tolist() == [True, False, False, False, True, False]
    assert ds.extra["test_camera"].tolist() == [1, 2, 2, 1, 1, 2]
    assert ds.extra["public_x"].shape == (1, 3, 32, 16)
    assert ds.train.x[0, 0].mean().item() == pytest.approx(200 / 255, abs=1e-3)


def test_missing_reid_data_names_the_folders(tmp_path):
    with pytest.raises(DatasetMissing, match="reid/Market.*How|Prepare"):
        load_dataset("reid9", tmp_path)
    missing = missing_files("reid9", tmp_path)
    assert any("reid/Market/pytorch/train_all/" in f for f in missing)
    assert any("reid/cuhk02/pytorch/train_all/" in f for f in missing) and len(missing) == 10
