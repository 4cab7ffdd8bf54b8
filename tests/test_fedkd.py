"""FedKD (Wu et al. 2022): SVD compression at an energy threshold, the threshold schedule, the adaptive mutual
distillation loss, the bytes a run counts, the text path (hidden states and attentions) and the paper-scale loaders."""
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from papers.fedkd.method import (aligned_blocks, compress_update, energy_threshold, factor_values, kept_rank,
                                 mutual_distillation_loss, svd_compress)


def numpy_rank(matrix: np.ndarray, energy: float) -> int:
    s = np.linalg.svd(matrix, compute_uv=False)
    fractions = np.cumsum(s ** 2) / np.sum(s ** 2)
    return int(np.argmax(fractions >= energy)) + 1


@pytest.mark.parametrize("energy", [0.5, 0.7, 0.9, 0.95, 0.98, 0.999])
@pytest.mark.parametrize("shape", [(30, 20), (12, 40), (64, 64)])
def test_svd_keeps_smallest_rank_reaching_the_energy_and_reconstructs_the_truncated_product(shape, energy):
    rng = np.random.default_rng(shape[0] + int(energy * 1000))
    # a decaying spectrum, like a gradient update's
    a = rng.standard_normal(shape) @ np.diag(0.8 ** np.arange(shape[1])) @ rng.standard_normal((shape[1], shape[1]))
    m = torch.tensor(a, dtype=torch.float64)
    u, s, vh = svd_compress(m, energy)
    k = len(s)
    assert k == numpy_rank(a, energy)
    sigma = np.linalg.svd(a, compute_uv=False)
    kept = np.sum(sigma[:k] ** 2) / np.sum(sigma ** 2)
    assert kept >= energy - 1e-12
    if k > 1:  # one fewer would not reach it
        assert np.sum(sigma[:k - 1] ** 2) / np.sum(sigma ** 2) < energy
    nu, ns, nvh = np.linalg.svd(a, full_matrices=False)
    expected = nu[:, :k] @ np.diag(ns[:k]) @ nvh[:k]
    np.testing.assert_allclose(((u * s) @ vh).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(s.numpy(), ns[:k], rtol=1e-12)


def test_kept_rank_edge_cases():
    assert kept_rank(torch.zeros(5), 0.95) == 0
    assert kept_rank(torch.tensor([3.0, 0.0, 0.0]), 0.95) == 1
    assert kept_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2  # exactly reaching counts
    assert kept_rank(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4


def test_threshold_schedule_rises_linearly_from_t_start_to_t_end():
    rounds = 10
    values = [energy_threshold(t, rounds, 0.95, 0.98) for t in range(rounds)]
    expected = [0.95 + 0.03 * (t + 1) / rounds for t in range(rounds)]
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-15)
    assert values[-1] == pytest.approx(0.98)
    assert all(b > a for a, b in zip(values, values[1:]))


def test_compressed_update_bytes_are_the_factors_or_dense_when_smaller():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(40, 2, generator=g) @ torch.randn(2, 50, generator=g)  # rank 2
    full = torch.randn(6, 5, generator=g)  # factors of any rank >= 1 are no smaller than 30 entries at rank 3
    conv = (torch.randn(8, 1, generator=g) @ torch.randn(1, 27, generator=g)).reshape(8, 3, 3, 3)  # rank 1
    bias = torch.randn(50, generator=g)
    sent, nbytes, ranks = compress_update({"low": low, "full": full, "conv": conv, "bias": bias}, 0.95)
    assert ranks == {"low": 2, "full": -1, "conv": 1}
    assert nbytes == 4 * (factor_values((40, 50), 2) + 30 + factor_values((8, 27), 1) + 50)
    torch.testing.assert_close(sent["low"], low, atol=1e-4, rtol=0)  # rank 2 holds all the energy
    assert torch.equal(sent["full"], full) and torch.equal(sent["bias"], bias)
    torch.testing.assert_close(sent["conv"], conv, atol=1e-5, rtol=0)
    _, dense, ranks = compress_update({"low": low, "bias": bias}, None)
    assert dense == 4 * (40 * 50 + 50) and ranks == {}


def test_adaptive_mutual_distillation_loss_equals_the_direct_formula():
    g = torch.Generator().manual_seed(1)
    zt, zs = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    ht, hs = [torch.randn(6, 5, 8, generator=g) for _ in range(2)], [torch.randn(6, 5, 8, generator=g) for _ in range(2)]
    at, as_ = [torch.rand(6, 2, 5, 5, generator=g)], [torch.rand(6, 2, 5, 5, generator=g)]

    def np_softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)
    pt, ps = np_softmax(zt.double().numpy()), np_softmax(zs.double().numpy())
    ce_t = -np.mean(np.log(pt[np.arange(6), y.numpy()]))
    ce_s = -np.mean(np.log(ps[np.arange(6), y.numpy()]))
    kl_st = np.mean(np.sum(ps * (np.log(ps) - np.log(pt)), 1))  # KL(p_s || p_t)
    kl_ts = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), 1))
    mse = sum(np.mean((a.double().numpy() - b.double().numpy()) ** 2) for a, b in zip(ht + at, hs + as_))
    expected = ce_t + ce_s + (kl_st + kl_ts + 2 * mse) / (ce_t + ce_s)
    got = mutual_distillation_loss(zt.double(), zs.double(), y, [h.double() for h in ht], [h.double() for h in hs],
                                   [a.double() for a in at], [a.double() for a in as_])
    assert got.item() == pytest.approx(expected, rel=1e-10)
    plain = mutual_distillation_loss(zt.double(), zs.double(), y, adaptive=False)
    assert plain.item() == pytest.approx(ce_t + ce_s + kl_st + kl_ts, rel=1e-10)


def test_each_model_learns_from_the_others_detached_prediction():
    """The distillation term of the mentor treats the mentee's prediction as a target (and vice versa): with the
    weight fixed, the gradient on the mentee's logits is that of its own task loss and KL(p_t || p_s) only."""
    g = torch.Generator().manual_seed(2)
    zt, zs = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(4, 3, generator=g, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    mutual_distillation_loss(zt, zs, y, adaptive=False).backward()
    zs2 = zs.detach().clone().requires_grad_(True)
    direct = F.cross_entropy(zs2, y) + F.kl_div(F.log_softmax(zs2, 1), F.softmax(zt.detach(), 1),
                                                  reduction="batchmean")
    direct.backward()
    torch.testing.assert_close(zs.grad, zs2.grad)


def test_aligned_blocks_follow_the_authors_mapping():
    # 12-layer mentor, 4-layer mentee: mentee block -1-l with mentor block -1-3l
    assert aligned_blocks(12, 4) == [(11, 3), (8, 2), (5, 1), (2, 0)]
    assert aligned_blocks(4, 1) == [(3, 0)]
    assert aligned_blocks(6, 2) == [(5, 1), (2, 0)]


MENTOR = {"name": "fedavg_cnn", "channels": [8, 16], "fc_width": 64}
RUN = {"dataset": {"name": "mnist5k", "train_limit": 200, "test_limit": 100}, "partition": {"scheme": "iid", "clients": 4},
       "model": {"name": "fedavg_cnn", "channels": [4, 8], "fc_width": 16},
       "training": {"rounds": 3, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 32, "lr": 0.001,
                    "optimizer": "adam"},
       "evaluation": {"per_client": True}, "seed": 0}


def test_bytes_counted_from_the_factors_sent():
    from common.train import execute
    spec = {**RUN, "model": {"name": "fedavg_cnn", "channels": [8, 16], "fc_width": 32},
            "method": {"name": "fedkd", "mentor": MENTOR, "hidden": False}}
    r = execute(spec, progress=False)
    m = r["metrics"]
    shapes = {"features.0.weight": (8, 25), "features.3.weight": (16, 200), "features.7.weight": (32, 784),
              "head.weight": (10, 32)}
    vectors = 8 + 16 + 32 + 10  # biases, dense
    dense_all = 4 * (sum(a * b for a, b in shapes.values()) + vectors)
    assert m["bytes_down"][0] == [dense_all] * 4  # the initial mentee
    for rnd in range(1, 3):  # the previous round's aggregate, as the server compressed it
        ranks = m["server_rank"][rnd - 1]
        expected = 4 * (sum(factor_values(shapes[k], r_) if r_ > 0 else math.prod(shapes[k])
                            for k, r_ in ranks.items()) + vectors)
        assert m["bytes_down"][rnd] == [expected] * 4
    assert all(0 < b < dense_all for row in m["bytes_up"][1:] for b in row)
    assert m["energy"] == pytest.approx([0.96, 0.97, 0.98])
    assert len(m["mentee_accuracy"]) == 3
    nosvd = execute({**spec, "method": {**spec["method"], "svd": False}}, progress=False)["metrics"]
    assert all(b == dense_all for row in nosvd["bytes_up"] for b in row)


def test_fedavg_trainable_sends_only_what_trains():
    from common.models import build_model
    model = build_model("pretrained_encoder", 1, 2, 1, checkpoint="minilm-l6", layers=2, trainable_layers=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("features.encoder.encoder.layer.1.", "head.")) for n in trainable)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "embeddings" in n)


def test_text_mentor_and_mentee_distil_hidden_states_and_attentions():
    """MiniLM-L6's first 2 layers as mentor, its first layer as mentee, on a few templated reviews: one round runs
    with the hidden-state and attention terms, and changes only what trains."""
    from common.train import execute
    spec = {"dataset": {"name": "reviews", "train_limit": 16, "test_limit": 8},
            "partition": {"scheme": "iid", "clients": 2},
            "model": {"name": "pretrained_encoder", "checkpoint": "minilm-l6", "layers": 1, "trainable_layers": 1},
            "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 1, "batch_size": 8, "lr": 0.001,
                         "optimizer": "adamw"},
            "evaluation": {"per_client": True}, "seed": 0,
            "method": {"name": "fedkd", "hidden": True,
                       "mentor": {"name": "pretrained_encoder", "checkpoint": "minilm-l6", "layers": 2,
                                  "trainable_layers": 1}}}
    r = execute(spec, progress=False)
    assert r["status"] == "completed" and math.isfinite(r["metrics"]["train_loss"][0])
    assert r["model"]["trainable_parameters"] < r["model"]["parameters"]


def test_text_encoder_outputs_pool_as_the_forward_pass():
    from common.models import build_model
    from papers.fedkd.method import encoder_outputs
    model = build_model("pretrained_encoder", 1, 2, 1, checkpoint="minilm-l6", layers=2).eval()
    model.features.encoder.set_attn_implementation("eager")
    ids = torch.tensor([[101, 2204, 2833, 102, 0], [101, 2919, 102, 0, 0]])
    logits, hidden, attn = encoder_outputs(model, ids, True)
    torch.testing.assert_close(logits, model(ids), atol=1e-5, rtol=1e-5)
    assert len(hidden) == 2 and len(attn) == 2 and attn[0].shape[-1] == 4
    torch.testing.assert_close(attn[0].sum(-1), torch.ones_like(attn[0].sum(-1)))


def write_checkpoint(root):
    from common.models.text import checkpoint_dir
    shutil.copytree(checkpoint_dir("minilm-l6"), root / "unilm-base")


def test_mind_and_adr_loaders_read_local_files(tmp_path):
    from common.data import load_dataset, missing_files
    assert any("MIND/train/news.tsv" in f for f in missing_files("mind", tmp_path))
    write_checkpoint(tmp_path)
    for split, rows in (("train", [("N1", "sports", "football", "a great match", "x"),
                                   ("N2", "news", "world", "the summit ended", "y"),
                                   ("N3", "sports", "tennis", "she won the final", "z")]),
                        ("dev", [("N4", "news", "us", "a new law", "w"), ("N5", "autos", "cars", "dropped", "v")])):
        (tmp_path / "MIND" / split).mkdir(parents=True)
        (tmp_path / "MIND" / split / "news.tsv").write_text(
            "".join("\t".join([*r, "http://x", "[]", "[]"]) + "\n" for r in rows))
    ds = load_dataset("mind", tmp_path)
    assert ds.num_classes == 2 and ds.train.y.tolist() == [1, 0, 1] and ds.test.y.tolist() == [0]  # autos dropped
    assert ds.train.x.dtype == torch.int64 and ds.train.x[0, 0].item() == 101  # [CLS]
    (tmp_path / "smm4h_adr").mkdir()
    (tmp_path / "smm4h_adr" / "train.tsv").write_text("1\tthis drug gave me a headache\n0\ttaking my meds\n")
    (tmp_path / "smm4h_adr" / "test.tsv").write_text("0\tfine \"today\"\n")
    adr = load_dataset("smm4h_adr", tmp_path)
    assert adr.train.y.tolist() == [1, 0] and adr.test.y.tolist() == [0] and adr.num_classes == 2
    assert missing_files("smm4h_adr", tmp_path) == []
