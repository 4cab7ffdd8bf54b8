"""FeSTA (papers/festa/method.py): the split step against the unsplit network, the bytes it counts, the task-wise
averaging of heads and tails, and the CXR loaders (generated cxr3 and the paper-scale image-folder layout)."""
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from common.data import cxr, load_dataset, missing_files
from common.errors import DatasetCorrupt, DatasetMissing
from common.models.vit_split import SplitViT
from papers.festa.method import body_weights, client_state_bytes, split_step, task_loss, unify

TOKENS, DIM = 16, 8  # 16x16 images, patches of 4: 16 tokens of dimension 8


def tiny(clients=3, seed=0):
    torch.manual_seed(seed)
    return SplitViT(1, 3, 16, clients=clients, dim=DIM, layers=1, heads=2, mlp=16, patch=4, width=4).double()


def batches(model, sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, n in sizes.items():
        x = torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64)
        task = model.task_of(k)
        if task == "classification":
            y = torch.randint(0, 3, (n,), generator=g)
        elif task == "detection":
            lo = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5
            y = torch.cat([lo, lo + 0.1 + 0.4 * torch.rand(n, 2, generator=g, dtype=torch.float64)], 1)
        else:
            y = (torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64) > 0.6).double()
        out[k] = (x, y)
    return out


def test_split_step_gives_the_unsplit_networks_gradients():
    """Heads, tails and body get, through the messages, the gradients autograd gives the composed network
    head -> body -> tail: each client's own loss for its head and tail, sum_k w_k dL_k/dB for the body."""
    model = tiny(clients=6)
    data = batches(model, {0: 5, 1: 4, 2: 3, 3: 6, 5: 2})  # client 4 (detection) has no batch this step
    w = body_weights(model, list(data))
    # two-level mean: 3 tasks present; classification 2 clients, detection 1, segmentation 2
    assert w == pytest.approx({0: 1 / 6, 3: 1 / 6, 1: 1 / 3, 2: 1 / 6, 5: 1 / 6})
    reference = copy.deepcopy(model)

    model.zero_grad(set_to_none=True)
    out = split_step(model, data, w)

    reference.zero_grad(set_to_none=True)
    losses = {k: task_loss(reference.task_of(k), reference(x, k), y) for k, (x, y) in data.items()}
    total = sum(w[k] * losses[k] for k in data)
    body = list(reference.body.parameters())
    expected_body = torch.autograd.grad(total, body, retain_graph=True)
    for p, g in zip(model.body.parameters(), expected_body):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
    for k in data:
        own = list(reference.heads[k].parameters()) + list(reference.tails[k].parameters())
        expected = torch.autograd.grad(losses[k], own, retain_graph=True)
        got = [p.grad for p in list(model.heads[k].parameters()) + list(model.tails[k].parameters())]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        assert out[k]["loss"] == pytest.approx(losses[k].item(), rel=1e-12)
    assert all(p.grad is None for p in model.heads[4].parameters())  # no batch, no gradient


def test_split_step_bytes_are_the_sizes_of_the_tensors_sent():
    """Per client and step: up = features (n, T, D) + body-output gradient (n, T, D), down = body output + feature
    gradient, float32 (4 bytes) or float64 (8 bytes) as sent."""
    model = tiny()
    data = batches(model, {0: 5, 1: 3, 2: 2})
    out = split_step(model, data, body_weights(model, list(data)))
    for k, (x, _) in data.items():
        assert out[k]["up"] == out[k]["down"] == 2 * len(x) * TOKENS * DIM * 8
    model32 = tiny().float()
    data32 = {k: (x.float(), y.float() if y.is_floating_point() else y) for k, (x, y) in data.items()}
    out = split_step(model32, data32, body_weights(model32, list(data32)))
    assert out[1]["up"] == 2 * 3 * TOKENS * DIM * 4


def test_unify_averages_heads_and_tails_within_each_task_only():
    model = tiny(clients=6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    for key in state:  # every client's head and tail different
        if state[key].is_floating_point():
            state[key] = state[key] + torch.randn(state[key].shape, generator=g, dtype=state[key].dtype)
    groups, sizes = [[0, 3], [1, 4], [2, 5]], {0: 10, 3: 30, 1: 5, 4: 5, 2: 7, 5: 1}
    new = unify(state, groups, sizes)
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] not in ("heads", "tails"):
            assert torch.equal(new[key], value)  # the body is not averaged
            continue
        k, name = int(parts[1]), ".".join(parts[2:])
        group = next(gr for gr in groups if k in gr)
        w = np.array([sizes[c] for c in group], dtype=np.float64)
        expected = sum(wi / w.sum() * state[f"{parts[0]}.{c}.{name}"].double().numpy() for wi, c in zip(w, group))
        np.testing.assert_allclose(new[key].double().numpy(), expected.astype(value.numpy().dtype), rtol=1e-6,
                                   atol=1e-6 if value.is_floating_point() else 1)
    # never across tasks: the classification heads (0, 3) and the detection heads (1, 4) stay different
    assert torch.equal(new["heads.0.net.0.weight"], new["heads.3.net.0.weight"])
    assert not torch.equal(new["heads.0.net.0.weight"], new["heads.1.net.0.weight"])
    assert torch.equal(new["heads.1.net.0.weight"], new["heads.4.net.0.weight"])
    # a group of one client is left as it is
    single = unify(state, [[0]], sizes)
    assert all(torch.equal(single[k], state[k]) for k in state)


def smoke_spec(rounds=2, unify_every=1, tasks=("classification", "detection", "segmentation"), pooled=False,
               all_targets=False):
    return {"dataset": {"name": "cxr3_smoke"}, "partition": {"scheme": "iid", "clients": 6},
            "model": {"name": "split_vit", "clients": 6, "dim": 16, "layers": 1, "heads": 2, "mlp": 32, "patch": 4,
                      "width": 4},
            "method": {"name": "festa", "tasks": list(tasks), "unify_every": unify_every, "pooled": pooled,
                       "all_targets": all_targets, "samples_per_client": {"classification": 7}},
            "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 2, "batch_size": 4, "lr": 0.001,
                         "optimizer": "adam"}, "seed": 1}


def test_run_logs_per_round_bytes_from_client_data_sizes():
    """A run's logged bytes per client and round: 2 epochs x n_k images x (features + gradient) x T x D x 4 bytes
    each way, plus the client's head and tail uploaded on a unifying round and downloaded in the round after."""
    from common.train import execute
    from common.models import build_model
    spec = smoke_spec(rounds=3, unify_every=2)
    r = execute(spec, progress=False)
    m = r["metrics"]
    sizes = r["data"]["client_sizes"]
    n = [min(7, s) if k % 3 == 0 else s for k, s in enumerate(sizes)]
    split = [2 * nk * 2 * 64 * 16 * 4 for nk in n]  # epochs x images x (2 tensors) x 64 tokens x dim 16 x 4 bytes
    model = build_model("split_vit", in_channels=1, num_classes=3, input_size=32, clients=6, dim=16, layers=1,
                        heads=2, mlp=32, patch=4, width=4)
    ht = [client_state_bytes(model.state_dict(), k) for k in range(6)]
    assert m["clients"] == [[0, 1, 2, 3, 4, 5]] * 3
    assert m["bytes_up"][0] == split and m["bytes_down"][0] == split  # round 1: no unifying
    assert m["bytes_up"][1] == [s + h for s, h in zip(split, ht)] and m["bytes_down"][1] == split  # round 2 unifies
    assert m["bytes_down"][2] == [s + h for s, h in zip(split, ht)] and m["bytes_up"][2] == split
    assert set(m["domain_accuracy"][-1]) == {"classification", "detection", "segmentation"}
    assert m["split_up"][0] == pytest.approx(np.mean(split))


def test_single_task_and_pooled_runs_use_only_that_tasks_clients():
    from common.train import execute
    r = execute(smoke_spec(rounds=1, tasks=("segmentation",)), progress=False)
    assert r["metrics"]["clients"] == [[2, 5]]
    r = execute(smoke_spec(rounds=1, tasks=("segmentation",), pooled=True), progress=False)
    sizes = r["data"]["client_sizes"]
    assert r["metrics"]["clients"] == [[2]]
    assert r["metrics"]["bytes_up"][0] == [2 * (sizes[2] + sizes[5]) * 2 * 64 * 16 * 4]


def test_pooled_run_with_all_targets_trains_every_task_on_every_clients_images():
    """The all-targets ceiling: one client per task, each holding the images of all six clients (the classification
    clients' first 7 images, the others' all), since every cxr3 image has all three targets."""
    from common.train import execute
    r = execute(smoke_spec(rounds=1, tasks=cxr.TASKS, pooled=True, all_targets=True), progress=False)
    sizes = r["data"]["client_sizes"]
    n = sum(min(7, s) if k % 3 == 0 else s for k, s in enumerate(sizes))
    assert r["metrics"]["clients"] == [[0, 1, 2]]
    assert r["metrics"]["bytes_up"][0] == [2 * n * 2 * 64 * 16 * 4] * 3
    with pytest.raises(Exception, match="all_targets"):
        execute(smoke_spec(rounds=1, all_targets=True), progress=False)


def test_cxr3_targets_agree():
    d = load_dataset("cxr3_smoke")
    t = d.extra["targets"]["train"]
    assert torch.equal(t["classification"], d.train.y)
    masks, boxes = t["segmentation"][:, 0], t["detection"]
    for i in range(len(masks)):  # each box is its mask's extent
        rows, cols = torch.nonzero(masks[i], as_tuple=True)
        expected = [cols.min().item() / 32, rows.min().item() / 32, (cols.max().item() + 1) / 32,
                    (rows.max().item() + 1) / 32]
        assert boxes[i].tolist() == pytest.approx(expected)
    assert d.train.x.min() >= 0 and d.train.x.max() <= 1 and d.train.x.shape[1:] == (1, 32, 32)


def write_png(path, value, size=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def write_fake_festa_cxr(root):
    base = root / "festa_cxr"
    for split in ("train", "test"):
        for c, cls in enumerate(["covid", "normal"]):
            for i in range(2):
                write_png(base / "classification" / split / cls / f"{i}.png", 40 + 100 * c)
        det = base / "detection" / split
        write_png(det / "images" / "a.png", 200)
        write_png(det / "images" / "b.png", 210)
        (det / "boxes.csv").write_text("file,x0,y0,x1,y1\na.png,2,4,10,12\nb.png,0,0,20,10\n")
        seg = base / "segmentation" / split
        write_png(seg / "images" / "s.png", 90)
        m = np.zeros((20, 20), np.uint8)
        m[:10, :5] = 255
        (seg / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(seg / "masks" / "s.png")
    return base


def test_paper_scale_cxr_loader_reads_labels_boxes_and_masks(tmp_path):
    write_fake_festa_cxr(tmp_path)
    d = cxr.festa_cxr(tmp_path, size=10)
    assert d.domains == ("classification", "detection", "segmentation") and d.num_classes == 2
    assert d.train.x.shape == (7, 1, 10, 10)
    has = d.extra["has"]["train"]
    assert has["classification"].tolist() == [True] * 4 + [False] * 3
    assert d.train.y[has["classification"]].tolist() == [0, 0, 1, 1]  # folders in sorted order: covid, normal
    assert d.train.x[0].mean().item() == pytest.approx(40 / 255, abs=1e-3)
    boxes = d.extra["targets"]["train"]["detection"][has["detection"]]
    np.testing.assert_allclose(boxes.numpy(), [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 0.5]], atol=1e-6)
    mask = d.extra["targets"]["train"]["segmentation"][has["segmentation"]][0, 0]
    # rows 0-9 and columns 0-4 of 20x20, resized by nearest neighbour to 10x10: rows 0-4, columns 0-1
    assert mask[:5, :2].all() and mask.sum().item() == 10
    assert d.train.domain.tolist() == [0, 0, 0, 0, 1, 1, 2]


def test_paper_scale_cxr_loader_errors(tmp_path):
    with pytest.raises(DatasetMissing, match="festa_cxr/classification/train/<class>/\\*.png"):
        load_dataset("festa_cxr", tmp_path)
    base = write_fake_festa_cxr(tmp_path)
    assert missing_files("festa_cxr", tmp_path) == []
    (base / "segmentation" / "test" / "masks" / "s.png").unlink()
    with pytest.raises(DatasetCorrupt, match="has no mask"):
        cxr.festa_cxr(tmp_path, size=10)
    write_png(base / "segmentation" / "test" / "masks" / "s.png", 0)
    (base / "detection" / "train" / "boxes.csv").write_text("file,x0\na.png,1\n")
    with pytest.raises(DatasetCorrupt, match="file,x0,y0,x1,y1"):
        cxr.festa_cxr(tmp_path, size=10)
