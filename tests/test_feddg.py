"""FedDG / ELCFS and the shared segmentation pieces: the maths pinned against independent computations."""
import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from common.data import load_dataset
from common.data.fundus_synth import SITES, generate
from common.data.partition import partition
from common.errors import DatasetMissing, SuiteError
from common.experiments import centralised_spec
from common.fl import get_algorithm
from common.models import build_model
from common.report.metrics import site_dice, site_hd95
from common.segmentation import dice, evaluate_segmentation, hd95, soft_dice_loss
from papers.feddg.method import (boundary_background, episodic_loss, interpolate_amplitude, low_window, nt_xent,
                                 region_embeddings)


def numpy_cfsi(x: np.ndarray, other: np.ndarray, lam: float, b: int) -> np.ndarray:
    """CFSI written independently with numpy: swap-interpolate the (2b+1)^2 centred amplitudes, keep the phase."""
    f = np.fft.fft2(x, axes=(-2, -1))
    amp, pha = np.abs(f), np.angle(f)
    a = np.fft.fftshift(amp, axes=(-2, -1))
    t = np.fft.fftshift(np.abs(np.fft.fft2(other, axes=(-2, -1))), axes=(-2, -1))
    h, w = x.shape[-2:]
    a[..., h // 2 - b:h // 2 + b + 1, w // 2 - b:w // 2 + b + 1] = \
        (1 - lam) * a[..., h // 2 - b:h // 2 + b + 1, w // 2 - b:w // 2 + b + 1] \
        + lam * t[..., h // 2 - b:h // 2 + b + 1, w // 2 - b:w // 2 + b + 1]
    return np.real(np.fft.ifft2(np.fft.ifftshift(a, axes=(-2, -1)) * np.exp(1j * pha), axes=(-2, -1)))


def images(seed=0, n=2, size=16):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=torch.float64)


# ---- continuous frequency space interpolation -----------------------------------------------------------------------

def test_low_window_is_centred_with_half_size_floor_ratio_times_side():
    assert low_window(64, 64, 0.05) == (slice(29, 36), slice(29, 36))  # b = 3: 7 x 7 around index 32
    assert low_window(384, 384, 0.003) == (slice(191, 194), slice(191, 194))  # the authors' demo: b = 1
    assert low_window(16, 16, 0.0) == (slice(8, 9), slice(8, 9))  # the zero frequency only


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_interpolation_matches_an_independent_numpy_computation(lam):
    x, other = images(0), images(1)
    amp_other = torch.fft.fft2(other).abs()
    ours = interpolate_amplitude(x, amp_other, torch.full((2,), lam, dtype=torch.float64), ratio=0.125, clip=None)
    ref = numpy_cfsi(x.numpy(), other.numpy(), lam, b=2)
    np.testing.assert_allclose(ours.numpy(), ref, atol=1e-10)
    assert not np.allclose(ref, x.numpy(), atol=1e-3)  # it did change the image


def test_lambda_zero_returns_the_original_image():
    x, other = images(0), images(1)
    out = interpolate_amplitude(x, torch.fft.fft2(other).abs(), torch.zeros(2), ratio=0.2, clip=None)
    np.testing.assert_allclose(out.numpy(), x.numpy(), atol=1e-12)


def test_interpolation_keeps_the_phase_and_changes_only_the_low_frequency_window():
    x, other = images(0), images(1)
    out = interpolate_amplitude(x, torch.fft.fft2(other).abs(), torch.tensor([0.7, 0.4], dtype=torch.float64), ratio=0.125, clip=None)
    fx, fo = np.fft.fftshift(np.fft.fft2(x.numpy()), axes=(-2, -1)), np.fft.fftshift(np.fft.fft2(out.numpy()), axes=(-2, -1))
    ft = np.fft.fftshift(np.fft.fft2(other.numpy()), axes=(-2, -1))
    np.testing.assert_allclose(np.angle(fo), np.angle(fx), atol=1e-8)  # phase kept everywhere
    inside = np.zeros((16, 16), dtype=bool)
    inside[6:11, 6:11] = True  # b = floor(16 * 0.125) = 2 around index 8
    np.testing.assert_allclose(np.abs(fo)[..., ~inside], np.abs(fx)[..., ~inside], atol=1e-9)
    lam = np.array([0.7, 0.4])[:, None, None, None]
    np.testing.assert_allclose(np.abs(fo)[..., inside], ((1 - lam) * np.abs(fx) + lam * np.abs(ft))[..., inside],
                               atol=1e-9)


# ---- segmentation metrics ----------------------------------------------------------------------------------------------

def test_dice_on_hand_made_masks():
    p = np.zeros((1, 8, 8), bool)
    t = np.zeros((1, 8, 8), bool)
    p[0, 2:6, 2:6] = True  # 16 pixels
    t[0, 2:6, 3:7] = True  # 16 pixels, 12 shared
    assert dice(p, t)[0] == pytest.approx(2 * 12 / 32)
    assert dice(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)))[0] == 1.0
    assert dice(p, np.zeros_like(t))[0] == 0.0


def test_hd95_on_hand_made_masks():
    a = np.zeros((2, 9, 9), bool)
    b = np.zeros((2, 9, 9), bool)
    a[0, 2, 1:8] = True  # a horizontal line ...
    b[0, 4, 1:8] = True  # ... and the same line two rows lower: every surface distance is 2
    a[1, 0, 0] = True  # one pixel against two: distances {0} and {0, 5}; 95th percentile of [0, 0, 5] is 4.5
    b[1, 0, 0] = b[1, 0, 5] = True
    np.testing.assert_allclose(hd95(a, b), [2.0, 4.5])
    assert math.isnan(hd95(a[:1], np.zeros((1, 9, 9), bool))[0])


def test_evaluate_segmentation_gives_dice_and_hd95_per_structure():
    class Fixed(torch.nn.Module):  # predicts the true disc and an empty cup
        def forward(self, x):
            return torch.where(x[:, :2] > 0.5, 10.0, -10.0)
    y = torch.zeros(3, 2, 8, 8)
    y[:, 0, 2:6, 2:6] = 1
    y[:, 1, 3:5, 3:5] = 1
    x = torch.cat([y[:, :1], torch.zeros(3, 2, 8, 8)], 1)
    m = evaluate_segmentation(Fixed(), x, y, ("disc", "cup"))
    assert m["dice"] == {"disc": 1.0, "cup": 0.0}
    assert m["hd95"]["disc"] == 0.0 and m["hd95"]["cup"] is None and m["hd95_undefined"]["cup"] == 3
    result = {"metrics": {"domain_dice": [{"A": m["dice"]}], "domain_hd95": [{"A": m["hd95"]}]}}
    assert site_dice(result, "A", "disc") == (100.0, False)
    assert math.isnan(site_hd95(result, "A", "cup")[0])


def test_soft_dice_loss_is_zero_for_a_perfect_prediction_and_one_for_a_disjoint_one():
    y = torch.zeros(2, 1, 4, 4)
    y[:, :, :2] = 1
    assert float(soft_dice_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    assert float(soft_dice_loss(1 - y, y)) == pytest.approx(1.0, abs=1e-6)


# ---- boundary-oriented episodic learning --------------------------------------------------------------------------------

def test_boundary_and_background_rings_from_erosion_and_dilation_of_a_square():
    m = np.zeros((1, 21, 21), bool)
    m[0, 8:13, 8:13] = True  # a 5 x 5 square
    bound, back = boundary_background(m, erosion=1, dilation=1)
    ring = m[0].copy()
    ring[9:12, 9:12] = False  # the 16 outer pixels of the square
    np.testing.assert_array_equal(bound[0], ring)
    assert back[0].sum() == 20 and not (back[0] & m[0]).any()  # 5 pixels beside each side (cross-shaped dilation)
    _, back5 = boundary_background(m, erosion=1, dilation=5)
    assert back5[0].sum() == sum(4 * 5 + 4 * (k - 1) for k in range(1, 6))  # L1 distance 1..5 from the square: 140


def test_region_embeddings_average_the_features_over_the_region():
    f = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    r = torch.zeros(2, 4, 4, dtype=torch.bool)
    r[0, 0, :2] = True
    e = region_embeddings(f, r)
    torch.testing.assert_close(e[0], f[0, :, 0, :2].mean(-1))
    torch.testing.assert_close(e[1], torch.zeros(3))  # empty region: zero


def test_nt_xent_against_the_formula_on_four_embeddings():
    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 1, 0, 0])
    t = 0.5
    zn = z / z.norm(dim=1, keepdim=True)
    s = (zn @ zn.T / t).numpy()
    expected = []
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        negs = [k for k in range(4) if labels[k] != labels[i]]
        expected.append(-math.log(math.exp(s[i, j]) / (math.exp(s[i, j]) + sum(math.exp(s[i, k]) for k in negs))))
    assert float(nt_xent(z, labels, t)) == pytest.approx(np.mean(expected), rel=1e-6)


def tiny_unet():
    torch.manual_seed(0)
    return build_model("unet", in_channels=3, num_classes=2, input_size=8, width=2, depth=2, convs=1)


def test_meta_step_gradient_matches_autograd_on_an_explicit_inner_step():
    model = tiny_unet()
    g = torch.Generator().manual_seed(1)
    x, x_t = torch.rand(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g)
    y = (torch.rand(2, 2, 8, 8, generator=g) > 0.5).float()
    meta_lr, clip = 0.1, 0.05
    loss, _ = episodic_loss(model, x, x_t, y, meta_lr, clip, contrastive_weight=0.0)
    loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    # independent: gradient of L_in at theta; theta' = theta - meta_lr * clip(g); gradient of L_out at theta'
    # (first order, as in the authors' code: d theta' / d theta = I)
    ref = tiny_unet()
    from common.segmentation import segmentation_loss
    g_in = torch.autograd.grad(segmentation_loss(ref(x), y), list(ref.parameters()))
    fast = tiny_unet()
    with torch.no_grad():
        for p, q, gi in zip(fast.parameters(), ref.parameters(), g_in):
            p.copy_(q - meta_lr * gi.clamp(-clip, clip))
    g_out = torch.autograd.grad(segmentation_loss(fast(x_t), y), list(fast.parameters()))
    assert any((gi.abs() > clip).any() for gi in g_in)  # the clip is exercised
    for a, gi, go in zip(ours, g_in, g_out):
        torch.testing.assert_close(a, gi + go, rtol=1e-5, atol=1e-7)


# ---- U-Net ------------------------------------------------------------------------------------------------------------

def test_unet_width_and_depth_are_parameters_and_features_are_returned():
    small = build_model("unet", in_channels=3, num_classes=2, input_size=16, width=4, depth=3)
    wide = build_model("unet", in_channels=3, num_classes=2, input_size=16, width=8, depth=3)
    x = torch.rand(2, 3, 16, 16)
    logits, feats = small(x, features=True)
    assert logits.shape == (2, 2, 16, 16) and feats.shape == (2, 4, 16, 16)
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in small.parameters())
    with pytest.raises(SuiteError, match="divisible"):
        small(torch.rand(1, 3, 10, 10))


# ---- data: generator, leave-one-site-out, paper-scale loaders -----------------------------------------------------------

def test_generator_is_deterministic_per_seed_and_sites_differ_in_low_frequencies():
    a, b, c = generate(1, 6, 1, 32), generate(1, 6, 1, 32), generate(2, 6, 1, 32)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["train_x"], c["train_x"])
    # the low-frequency amplitudes (the 3x3 window around the zero frequency: mean colour, gradients), per site:
    # site means far apart compared with the spread of images around their site's mean
    amp = np.abs(np.fft.fftshift(np.fft.fft2(a["train_x"]), axes=(-2, -1)))[..., 15:18, 15:18].reshape(len(a["train_x"]), -1)
    amp = np.log(amp)
    site = a["train_site"]
    means = np.stack([amp[site == d].mean(0) for d in range(len(SITES))])
    within = np.mean([np.linalg.norm(amp[site == d] - means[d], axis=1).mean() for d in range(len(SITES))])
    between = min(np.linalg.norm(means[i] - means[j]) for i in range(4) for j in range(i + 1, 4))
    assert between > 1.5 * within
    # and the zero frequency alone (mean colour per channel) separates every pair of sites by far more
    dc = a["train_x"].mean((2, 3))
    dmeans = np.stack([dc[site == d].mean(0) for d in range(4)])
    dwithin = max(np.linalg.norm(dc[site == d] - dmeans[d], axis=1).max() for d in range(4))
    assert min(np.linalg.norm(dmeans[i] - dmeans[j]) for i in range(4) for j in range(i + 1, 4)) > 2 * dwithin
    # the anatomy does not depend on the site: disc areas have similar means
    areas = a["train_y"][:, 0].sum((1, 2))
    assert np.ptp([areas[site == d].mean() for d in range(4)]) < 0.5 * areas.mean()


def test_leave_one_site_out_partition_and_its_ceiling():
    domains = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    masks = torch.zeros(8, 2, 4, 4)
    parts = partition(masks, "domain", 0, domains=domains, domain_names=SITES, clients=3, hold_out="B")
    assert [p.tolist() for p in parts] == [[0, 1], [4, 5], [6, 7]]
    with pytest.raises(SuiteError, match="clients must be 3"):
        partition(masks, "domain", 0, domains=domains, domain_names=SITES, clients=4, hold_out="B")
    with pytest.raises(SuiteError, match="not a domain"):
        partition(masks, "domain", 0, domains=domains, domain_names=SITES, clients=3, hold_out="Z")
    spec = {"dataset": {"name": "fundus4"}, "partition": {"scheme": "domain", "clients": 3, "hold_out": "B"},
            "method": {"name": "elcfs"}, "training": {"rounds": 2, "local_epochs": 1, "client_fraction": 1.0}}
    assert centralised_spec([spec])["partition"] == {"scheme": "domain", "clients": 4}


def test_missing_paper_dataset_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetMissing, match=r"Fundus/client1/data_npy/\*\.npy"):
        load_dataset("fundus", tmp_path)
    with pytest.raises(DatasetMissing, match=r"Prostate/HK/\*\.npy"):
        load_dataset("prostate", tmp_path)


def test_paper_scale_loaders_read_the_authors_npy_layout(tmp_path):
    rng = np.random.default_rng(0)
    for k in range(1, 5):
        folder = tmp_path / "Fundus" / f"client{k}" / "data_npy"
        folder.mkdir(parents=True)
        for i in range(5):
            a = np.concatenate([rng.integers(0, 256, (16, 16, 3)), rng.integers(0, 2, (16, 16, 2))], -1)
            np.save(folder / f"s{i}.npy", a.astype(np.float32))
    ds = load_dataset("fundus", tmp_path)
    assert ds.domains == ("A", "B", "C", "D") and ds.extra["structures"] == ("disc", "cup")
    assert ds.train.x.shape == (16, 3, 16, 16) and ds.test.y.shape == (4, 2, 16, 16)
    assert float(ds.train.x.max()) <= 1.0 and set(ds.train.y.unique().tolist()) <= {0.0, 1.0}
    for site in ("ISBI", "ISBI_1.5", "I2CVB", "UCL", "BIDMC", "HK"):
        folder = tmp_path / "Prostate" / site
        folder.mkdir(parents=True)
        for i in range(5):
            np.save(folder / f"s{i}.npy", np.concatenate([rng.random((8, 8, 3)), rng.integers(0, 2, (8, 8, 1))], -1))
    ds = load_dataset("prostate", tmp_path)
    assert ds.domains == tuple("ABCDEF") and ds.train.y.shape[1] == 1 and len(ds.test.y) == 6


def test_elcfs_runs_in_the_engine_and_its_ablations_are_parameters():
    from common.data import Dataset, Split
    from common.fl import FederatedRun, RunContext
    g = generate(3, 4, 2, 16)
    t = {k: torch.from_numpy(v) for k, v in g.items()}
    data = Dataset("f", Split(t["train_x"], t["train_y"], t["train_site"]), Split(t["test_x"], t["test_y"], t["test_site"]),
                   2, extra={"structures": ("disc", "cup")}, domains=SITES)
    parts = partition(data.train.y, "domain", 0, domains=data.train.domain, domain_names=SITES, clients=3, hold_out="A")
    finals = {}
    for name, method in {"fedavg": {"name": "fedavg"}, "elcfs": {"name": "elcfs", "window": 0.1},
                         "nocfsi": {"name": "elcfs", "cfsi": False}}.items():
        spec = {"method": method, "seed": 0, "training": {"rounds": 1, "client_fraction": 1.0, "local_epochs": 1,
                                                          "batch_size": 4, "lr": 1e-3, "optimizer": "adam"}}
        torch.manual_seed(0)
        make = lambda: build_model("unet", in_channels=3, num_classes=2, input_size=16, width=2, depth=2)  # noqa: E731
        ctx = RunContext(spec=spec, data=data, parts=parts, model=make(), make_model=make, device=torch.device("cpu"),
                         data_root="data")
        algo = get_algorithm(method)
        hist = FederatedRun(ctx, algo).train(progress=False)
        assert set(hist.extra["domain_dice"][-1]) == set(SITES)  # every site evaluated, the held-out one too
        finals[name] = (hist.test_loss[-1], hist.extra["bytes_up"][0])
    assert len({v[0] for v in finals.values()}) == 3  # three different local objectives
    # the amplitude bank travels once (first round) with CFSI only
    assert finals["elcfs"][1][0] > finals["fedavg"][1][0] == finals["nocfsi"][1][0]
