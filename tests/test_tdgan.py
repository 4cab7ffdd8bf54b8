"""TDGAN: the nuclei-like centres, the losses, the stage schedule, the paper-scale loader."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data import Dataset, Split, load_dataset
from common.data.nuclei import CENTRES, ORGANS, ORGANS_DIR, generate
from common.errors import DatasetCorrupt, DatasetMissing, SuiteError
from common.fl import FederatedRun, RunContext, get_algorithm
from common.models import build_model
from common.models.gan import PatchDiscriminator
from common.models.perceptual import VGG16_LAYERS, load_vgg16_features, perceptual_loss
from papers.tdgan.method import gan_loss, reminding_loss, reminding_terms


def test_generator_is_deterministic_per_seed_and_centres_differ():
    a, b, c = generate(6, seed=0), generate(6, seed=0), generate(6, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["x"], c["x"])
    assert a["x"].shape == (18, 3, 32, 32) and a["y"].shape == (18, 1, 32, 32)
    assert set(a["y"].unique().tolist()) == {0.0, 1.0} and a["centre"].tolist() == [0] * 6 + [1] * 6 + [2] * 6
    # each centre's background is its stain colour; the fluorescence-like one is dark, the others bright
    background = [a["x"][a["centre"] == k].permute(1, 0, 2, 3)[:, (a["y"][a["centre"] == k] == 0).squeeze(1)].mean(1)
                  for k in range(3)]
    for k, centre in enumerate(CENTRES):
        assert torch.allclose(background[k], torch.tensor(centre.background), atol=0.08)
    # nuclei differ from the background in every centre; in the fluorescence-like one they are brighter
    for k in range(3):
        x, y = a["x"][a["centre"] == k].mean(1), a["y"][a["centre"] == k].squeeze(1) > 0
        assert (x[y].mean() - x[~y].mean()).abs() > 0.2
    assert a["x"][12:].mean(1)[a["y"][12:].squeeze(1) > 0].mean() > background[2].mean() + 0.2


def test_centres_have_their_own_nucleus_statistics():
    d = generate(40, seed=3)
    area = [d["y"][d["centre"] == k].mean().item() for k in range(3)]
    counts = [np.mean([len(np.unique(__import__("scipy").ndimage.label(m[0].numpy())[0])) - 1
                       for m in d["y"][d["centre"] == k]]) for k in range(3)]
    assert counts[1] > counts[0] + 2  # the IHC-like centre: many small nuclei
    assert area[1] / counts[1] < area[0] / counts[0]


def test_gan_loss_is_the_binary_cross_entropy_of_every_patch():
    logits = torch.tensor([[[[0.3, -1.2], [2.0, 0.0]]]])
    manual_real = -torch.log(torch.sigmoid(logits)).mean()
    manual_fake = -torch.log(1 - torch.sigmoid(logits)).mean()
    assert torch.allclose(gan_loss(logits, True), manual_real)
    assert torch.allclose(gan_loss(logits, False), manual_fake)


def small_generator(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet_generator", in_channels=3, num_classes=1, input_size=16, width=4, downsamples=1,
                       blocks=1)


def test_reminding_loss_is_zero_for_the_previous_generator_itself_and_the_l1_otherwise():
    g = small_generator()
    maps = [(torch.rand(4, 1, 16, 16) > 0.7).float(), (torch.rand(3, 1, 16, 16) > 0.7).float()]
    same = copy.deepcopy(g)
    assert reminding_loss(g, same, maps).item() == 0.0
    assert reminding_loss(g, None, maps).item() == 0.0  # first stage: nothing to remember
    other = small_generator(seed=1)
    expected = sum(F.l1_loss(g(m), other(m)) for m in maps)
    got = reminding_loss(g, other, maps)
    assert got.item() > 0 and torch.allclose(got, expected)
    got.backward()  # gradients reach the current generator only
    assert all(p.grad is None for p in other.parameters()) and any(p.grad is not None for p in g.parameters())


def test_patch_discriminator_scores_patches_of_the_pair():
    d = PatchDiscriminator(1 + 3, width=8, layers=2)
    out = d(torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 1, 6, 6)


def tiny_centres():
    g = generate(8, size=16, seed=0)
    train = torch.arange(24) % 8 < 6
    split = lambda m: Split(g["x"][m], g["y"][m], g["centre"][m])  # noqa: E731
    return Dataset("nuclei", split(train), split(~train), 1, extra={"structures": ("nucleus",)},
                   domains=tuple(c.name for c in CENTRES))


def run_stages(method, rounds=3, data_root="data"):
    data = tiny_centres()
    parts = [(data.train.domain == k).nonzero().flatten() for k in range(3)]
    spec = {"method": method, "seed": 0, "training": {"rounds": rounds, "client_fraction": 1.0, "local_epochs": 2,
                                                      "batch_size": 6, "lr": 0.0002}}
    ctx = RunContext(spec=spec, data=data, parts=parts, model=small_generator(), make_model=small_generator,
                     device=torch.device("cpu"), data_root=str(data_root))
    algo = get_algorithm(method)
    hist = FederatedRun(ctx, algo).train(progress=False)
    return hist, algo, ctx


SMALL = {"discriminator_width": 4, "discriminator_layers": 1, "segmenter": {"width": 4, "depth": 2, "epochs": 1}}


def test_stage_t_visits_centre_t_and_keeps_the_generator_it_leaves():
    hist, algo, ctx = run_stages({"name": "tdgan", **SMALL})
    assert hist.extra["clients"] == [[0], [1], [2]]
    assert algo.visited == [0, 1, 2]
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in algo.previous.items())
    assert len(hist.extra["centre_dice"][-1]) == 3 and len(hist.extra["generated"][-1]) == 3


def test_local_gan_visits_only_its_centre_and_equals_the_first_stage_at_centre_zero():
    local, algo, _ = run_stages({"name": "tdgan", "reminding": 0, "centre": 1, **SMALL}, rounds=2)
    assert local.extra["clients"] == [[1], [1]] and algo.visited == [1]
    first, _, _ = run_stages({"name": "tdgan", "reminding": 0, "centre": 0, **SMALL}, rounds=1)
    tdgan, _, _ = run_stages({"name": "tdgan", **SMALL}, rounds=1)
    assert first.extra["centre_l1"] == tdgan.extra["centre_l1"]  # centre 0's GAN is TDGAN's first stage
    with pytest.raises(SuiteError, match="centre 3 does not exist"):
        run_stages({"name": "tdgan", "centre": 3, **SMALL}, rounds=1)


def test_label_code_gives_centre_k_of_k_the_grey_level_k_plus_1_over_k_and_changes_the_generator_input():
    from papers.tdgan.method import coded
    maps = torch.ones(3, 1, 2, 2)
    assert torch.equal(coded(maps, torch.tensor([1 / 3, 2 / 3, 1.0]))[:, 0, 0, 0], torch.tensor([1 / 3, 2 / 3, 1.0]))
    plain, _, ctx = run_stages({"name": "tdgan", **SMALL}, rounds=1)
    algo = get_algorithm({"name": "tdgan", "label_code": True, **SMALL})
    run = FederatedRun(ctx, algo)
    expected = (ctx.data.train.domain.float() + 1) / 3
    assert torch.equal(algo.train_codes(run), expected)
    with_code, _, _ = run_stages({"name": "tdgan", "label_code": True, **SMALL}, rounds=1)
    assert with_code.extra["centre_l1"] != plain.extra["centre_l1"]


def test_reminding_changes_nothing_in_the_first_stage_and_everything_after():
    tdgan, _, _ = run_stages({"name": "tdgan", **SMALL})
    sequential, _, _ = run_stages({"name": "tdgan", "reminding": 0, **SMALL})
    assert tdgan.extra["centre_l1"][0] == sequential.extra["centre_l1"][0]  # stage 1: same seed, same generator
    assert tdgan.extra["centre_l1"][1] != sequential.extra["centre_l1"][1]


def write_organ(path, n, size=16, seed=0, under_train=True):
    import h5py
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        db = f.create_group("train") if under_train else f
        for i in range(n):
            db.create_dataset(f"images/img{i}", data=rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            db.create_dataset(f"labels/img{i}", data=(rng.random((size, size)) > 0.5).astype(np.uint8) * 255)


def test_nuclei_organs_reads_the_official_h5_files(tmp_path):
    folder = tmp_path / ORGANS_DIR
    folder.mkdir(parents=True)
    for k, organ in enumerate(ORGANS):
        write_organ(folder / f"train_{organ}.h5", n=5 + k, seed=k, under_train=k % 2 == 0)
    ds = load_dataset("nuclei_organs", tmp_path)
    assert ds.domains == ORGANS and ds.extra["structures"] == ("nucleus",)
    assert len(ds.train) + len(ds.test) == 5 + 6 + 7 + 8
    assert [int((ds.test.domain == k).sum()) for k in range(4)] == [1, 1, 1, 2]  # 20% of each organ, rounded
    assert ds.train.x.shape[1:] == (3, 16, 16) and 0 <= ds.train.x.min() and ds.train.x.max() <= 1
    assert set(ds.train.y.unique().tolist()) == {0.0, 1.0}
    again = load_dataset("nuclei_organs", tmp_path)
    assert torch.equal(again.test.x, ds.test.x)


def test_nuclei_organs_missing_or_damaged_files_are_one_clear_error(tmp_path):
    with pytest.raises(DatasetMissing, match="train_liver.h5.*TDGAN-PyTorch"):
        load_dataset("nuclei_organs", tmp_path)
    folder = tmp_path / ORGANS_DIR
    folder.mkdir(parents=True)
    for organ in ORGANS:
        (folder / f"train_{organ}.h5").write_bytes(b"not an h5 file")
    with pytest.raises(DatasetCorrupt, match="train_liver.h5 is not a readable TDGAN nuclei file"):
        load_dataset("nuclei_organs", tmp_path)


def vgg16_meta():
    import torchvision
    with torch.device("meta"):
        return torchvision.models.vgg16(weights=None)


def write_vgg16(path, seed=0):
    """A random torchvision vgg16 state dict: every convolution of `features` (scaled so that activations stay of
    order one) and the classifier's biases (its large weight matrices are left out to keep the file small)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in vgg16_meta().state_dict().items():
        if k.startswith("features.") or k.endswith("bias"):
            fan_in = v[0].numel() if v.dim() > 1 else 1
            state[k] = torch.randn(v.shape, generator=gen) * (2 / fan_in) ** 0.5
    torch.save(state, path)
    return state


def test_perceptual_features_are_torchvision_vgg16_frozen_in_eval_mode(tmp_path):
    write_vgg16(tmp_path / "vgg.pth")
    features = load_vgg16_features(tmp_path / "vgg.pth")
    assert not features.training
    features.train()  # stays in eval mode
    assert not features.training and all(not p.requires_grad for p in features.parameters())
    out = features(torch.rand(2, 3, 16, 16))
    assert [tuple(o.shape) for o in out] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4), (2, 512, 2, 2)]
    assert sorted(VGG16_LAYERS.values()) == ["relu1_2", "relu2_2", "relu3_3", "relu4_3"]


def test_perceptual_loss_is_zero_for_identical_images_and_the_official_mse_otherwise(tmp_path):
    state = write_vgg16(tmp_path / "vgg.pth", seed=1)
    features = load_vgg16_features(tmp_path / "vgg.pth")
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    assert perceptual_loss(features, a, a).item() == 0.0
    # by hand: torchvision's vgg16 with the same weights, activations after features[3], [8], [15], [22] (relu1_2,
    # relu2_2, relu3_3, relu4_3), per layer the summed squared difference over the activation count, then / 4
    reference = vgg16_meta()
    reference.load_state_dict(state, strict=False, assign=True)

    def activations(x):
        out = []
        for i in range(23):
            x = reference.features[i](x)
            if i in (3, 8, 15, 22):
                out.append(x.clone())
        return out
    with torch.no_grad():
        fa, fb = activations(a), activations(b)
    expected = sum(((u - v) ** 2).sum() / u.numel() for u, v in zip(fa, fb)) / 4
    got = perceptual_loss(features, a, b)
    assert got.item() > 0 and torch.allclose(got, expected, rtol=1e-5)
    # gradients reach the image only, never VGG-16's weights
    image = a.clone().requires_grad_(True)
    perceptual_loss(features, image, b).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


def test_missing_or_damaged_vgg16_weights_are_one_clear_error(tmp_path):
    with pytest.raises(SuiteError, match=r"VGG-16 weights at .*nothere\.pth.*vgg16-397923af\.pth"):
        load_vgg16_features(tmp_path / "nothere.pth")
    (tmp_path / "bad.pth").write_bytes(b"not a state dict")
    with pytest.raises(SuiteError, match="bad.pth is not a torchvision vgg16 state dict"):
        load_vgg16_features(tmp_path / "bad.pth")
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(SuiteError, match="partial.pth is not a torchvision vgg16 state dict"):
        load_vgg16_features(tmp_path / "partial.pth")


def test_reminding_perceptual_term_compares_with_the_previous_generator(tmp_path):
    write_vgg16(tmp_path / "vgg.pth")
    features = load_vgg16_features(tmp_path / "vgg.pth")
    g, other = small_generator(), small_generator(seed=1)
    maps = [(torch.rand(2, 1, 16, 16) > 0.7).float(), (torch.rand(3, 1, 16, 16) > 0.7).float()]
    l1, perceptual = reminding_terms(g, other, maps, features)
    assert torch.allclose(l1, reminding_loss(g, other, maps))
    with torch.no_grad():
        expected = sum(perceptual_loss(features, g(m), other(m)) for m in maps)
    assert perceptual.item() > 0 and torch.allclose(perceptual, expected)
    assert reminding_terms(g, copy.deepcopy(g), maps, features)[1].item() == 0.0
    assert reminding_terms(g, other, maps)[1].item() == 0.0  # no features: no perceptual term


def test_tdgan_with_the_perceptual_loss_trains_and_needs_the_weights_file(tmp_path):
    write_vgg16(tmp_path / "vgg.pth")
    with_p = {"name": "tdgan", "perceptual": 10, "reminding_perceptual": 10, "perceptual_weights": "vgg.pth", **SMALL}
    hist, algo, _ = run_stages(with_p, rounds=2, data_root=tmp_path)
    plain, _, _ = run_stages({"name": "tdgan", **SMALL}, rounds=2, data_root=tmp_path)
    assert algo.vgg is not None and all(np.isfinite(hist.train_loss))
    assert hist.extra["centre_l1"][0] != plain.extra["centre_l1"][0]  # the digesting term acts from stage 1
    assert "vgg" not in algo.checkpoint_state()["attributes"]
    with pytest.raises(SuiteError, match="missing.pth"):
        run_stages({**with_p, "perceptual_weights": "missing.pth"}, rounds=1, data_root=tmp_path)
