"""DOSFL (papers/dosfl): distillation gradients through the unrolled training equal finite differences, the server
replays the distilled steps, the upload is counted by hand, and a one-round run learns."""
import pytest
import torch
from torch import nn

from common.fl import FederatedRun, get_algorithm
from common.fl.communication import LABEL_BYTES
from papers.dosfl.method import distillation_loss, unrolled_training

from test_fl import make_ctx


def tiny_problem():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}
    x_syn = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y_syn = torch.tensor([[0, 1, 2], [0, 1, 2]])
    step_sizes = torch.tensor([0.3, 0.2, 0.25, 0.1], dtype=torch.float64, requires_grad=True)  # 2 steps x 2 epochs
    x_real = torch.randn(7, 4, generator=g, dtype=torch.float64)
    y_real = torch.randint(3, (7,), generator=g)
    return model, params, x_syn, y_syn, step_sizes, x_real, y_real


def test_distilled_data_gradients_equal_finite_differences():
    model, params, x_syn, y_syn, step_sizes, x_real, y_real = tiny_problem()
    loss = distillation_loss(model, params, x_syn, y_syn, step_sizes, x_real, y_real)
    gx, glr = torch.autograd.grad(loss, [x_syn, step_sizes])

    def f(xs, lrs):
        return distillation_loss(model, params, xs, y_syn, lrs, x_real, y_real).item()

    h = 1e-6
    for idx in [(0, 0, 0), (0, 2, 3), (1, 1, 1), (1, 2, 0)]:
        e = torch.zeros_like(x_syn)
        e[idx] = h
        fd = (f(x_syn.detach() + e, step_sizes.detach()) - f(x_syn.detach() - e, step_sizes.detach())) / (2 * h)
        assert abs(gx[idx].item() - fd) < 1e-7 * max(1.0, abs(fd)), idx
    for i in range(len(step_sizes)):
        e = torch.zeros_like(step_sizes)
        e[i] = h
        fd = (f(x_syn.detach(), step_sizes.detach() + e) - f(x_syn.detach(), step_sizes.detach() - e)) / (2 * h)
        assert abs(glr[i].item() - fd) < 1e-7 * max(1.0, abs(fd)), i


def test_unrolled_training_is_plain_sgd_on_the_distilled_steps():
    model, params, x_syn, y_syn, step_sizes, _, _ = tiny_problem()
    out = unrolled_training(model, params, x_syn.detach(), y_syn, step_sizes.detach(), create_graph=False)
    ref = model
    opt = torch.optim.SGD(ref.parameters(), lr=1.0)
    for i, eta in enumerate(step_sizes.tolist()):
        for group in opt.param_groups:
            group["lr"] = eta
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x_syn.detach()[i % 2]), y_syn[i % 2]).backward()
        opt.step()
    for k, p in ref.named_parameters():
        torch.testing.assert_close(out[k].detach(), p.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("server", ["serial", "parallel"])
def test_one_round_upload_counted_by_hand_and_the_model_learns(server):
    method = {"name": "dosfl", "distill_steps": 2, "distill_epochs": 2, "images_per_class": 1, "distill_lr": 0.05,
              "server": server, "soft_reset": 0.01, "random_masking": 0.2}
    ctx = make_ctx(method, rounds=1, fraction=1.0, epochs=3)
    run = FederatedRun(ctx, get_algorithm(method))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    hist = run.train(progress=False)
    # tiny task: 3 classes of 1x4x4 inputs; 2 steps x 3 examples, 4 step sizes, one byte per label
    per_client = 2 * 3 * 16 * 4 + 4 * 4 + 2 * 3 * LABEL_BYTES
    assert hist.extra["bytes_up"] == [[per_client] * 6]
    assert hist.rounds == [1] and hist.train_loss[0] == hist.train_loss[0]
    changed = [k for k in before if not torch.equal(before[k], run.final_state[k])]
    assert changed, "the server trained nothing"
    # the uploaded step sizes were learned (they start at the spec's lr)
    assert any(not torch.allclose(d["step_sizes"], torch.full_like(d["step_sizes"], 0.1))
               for d in run.algo.distilled.values())


def write_fake_imdb(root):
    for split, texts in (("train", {"neg": ["Dull, dull film.", "Awful acting"], "pos": ["A great film!", "great"]}),
                         ("test", {"neg": ["dull plot"], "pos": ["Great cast, unseen-word"]})):
        for label, reviews in texts.items():
            folder = root / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i, text in enumerate(reviews):
                (folder / f"{i}_1.txt").write_text(text)


def test_imdb_loader_reads_the_extracted_archive(tmp_path):
    """The paper-scale IMDB text set (its columns need a text model; the loader is tested on files written here)."""
    from common.data import load_dataset, missing_files
    from common.data.text import IMDB_LENGTH, UNKNOWN
    from common.errors import DatasetMissing
    with pytest.raises(DatasetMissing, match="aclImdb/train/neg/.*ai.stanford.edu"):
        load_dataset("imdb", data_root=tmp_path)
    write_fake_imdb(tmp_path)
    assert missing_files("imdb", tmp_path) == []
    d = load_dataset("imdb", data_root=tmp_path)
    assert d.train.x.shape == (4, IMDB_LENGTH) and d.train.y.tolist() == [0, 0, 1, 1] and d.num_classes == 2
    assert d.test.y.tolist() == [0, 1]
    dull, great = d.train.x[0, 0].item(), d.train.x[2, 1].item()
    assert d.train.x[0, :3].tolist() == [dull, d.train.x[0, 1].item(), dull] and d.test.x[0, 0] == dull
    assert d.test.x[1, 0] == great and UNKNOWN in d.test.x[1].tolist()  # "unseen" is not in training
    assert d.train.x[3, 1:].eq(0).all()  # padded


def test_trec6_loader_reads_the_label_files(tmp_path):
    from common.data import load_dataset
    from common.data.text import TREC_CLASSES
    from common.errors import DatasetCorrupt
    folder = tmp_path / "trec"
    folder.mkdir()
    (folder / "train_5500.label").write_bytes(b"DESC:manner How did serfdom develop ?\nNUM:date When was Ozzy born ?\n")
    (folder / "TREC_10.label").write_bytes(b"LOC:city What city had a world fair in 1900 ?\n")
    d = load_dataset("trec6", data_root=tmp_path)
    assert d.num_classes == 6 and d.train.y.tolist() == [TREC_CLASSES.index("DESC"), TREC_CLASSES.index("NUM")]
    assert d.test.y.tolist() == [TREC_CLASSES.index("LOC")] and d.train.x.shape == (2, 40)
    (folder / "TREC_10.label").write_bytes(b"no label here\n")
    with pytest.raises(DatasetCorrupt, match="TREC_10.label, line 1"):
        load_dataset("trec6", data_root=tmp_path)
