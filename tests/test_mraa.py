"""MRAA: region affines from heatmap moments, warping, the equivariance transform, AKD/MKR, the articulated-video
generator and the paper-scale video loaders."""
import math

import numpy as np
import pytest
import torch

from common.data import load_dataset
from common.data.videos import PAPER_LAYOUTS, generate_articulated, load_paper_videos, read_video
from common.errors import DatasetMissing
from common.models import build_model
from common.models.motion import (coordinate_grid, gaussians, heatmap_moments, pca_affine, sign_fixed,
                                  sparse_motions, warp)
from papers.mraa.method import RandomTransform, akd, mkr


def rotation(a: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def blob(centre, angle, stds, size=128) -> torch.Tensor:
    """A normalised Gaussian heatmap (1, 1, size, size) with covariance R diag(stds^2) R^T."""
    R = rotation(angle)
    cov = R @ torch.diag(torch.tensor(stds) ** 2) @ R.T
    g = gaussians(torch.tensor([[centre]]), cov.view(1, 1, 2, 2), size, size)
    return g / g.sum()


@pytest.mark.parametrize("angle,stds", [(0.6, (0.15, 0.07)), (-1.2, (0.05, 0.12)), (2.5, (0.2, 0.1))])
def test_pca_affine_recovers_rotation_and_scale_of_a_gaussian_blob(angle, stds):
    heat = blob((0.1, -0.2), angle, stds)
    centre, covar = heatmap_moments(heat)
    assert torch.allclose(centre[0, 0], torch.tensor([0.1, -0.2]), atol=1e-3)
    A = pca_affine(covar)[0, 0]
    major, minor = max(stds), min(stds)
    # the principal axes: the major axis is the blob's first axis when stds[0] is the larger, else its second
    expected = rotation(angle if stds[0] >= stds[1] else angle + math.pi / 2) @ torch.diag(torch.tensor([major, minor]))
    # PCA's axes are defined up to sign: A or -A
    assert torch.allclose(sign_fixed(A), sign_fixed(expected), atol=2e-3), (A, expected)
    assert torch.allclose(A @ A.T, covar[0, 0], atol=1e-6)


def test_region_motion_between_rotated_blobs_is_the_rotation():
    """A_s A_d^-1 maps the driving region's frame onto the source's: for a blob turned by 0.5 rad and scaled 1.5x,
    it is that rotation and scale."""
    src = pca_affine(heatmap_moments(blob((0.0, 0.0), 0.3, (0.12, 0.05)))[1])
    drv = pca_affine(heatmap_moments(blob((0.0, 0.0), 0.8, (0.18, 0.075)))[1])
    m = sign_fixed(src @ torch.linalg.inv(drv))[0, 0]
    assert torch.allclose(m, rotation(-0.5) / 1.5, atol=3e-3)


def test_warping_with_the_identity_motion_returns_the_input():
    torch.manual_seed(0)
    img = torch.rand(2, 3, 16, 20)
    grid = coordinate_grid(16, 20).expand(2, -1, -1, -1)
    assert torch.allclose(warp(img, grid), img, atol=1e-6)
    # the same region in source and driving, no background motion: every sparse motion is the identity
    regions = {"shift": torch.rand(2, 4, 2) - 0.5, "affine": pca_affine(torch.eye(2).expand(2, 4, 2, 2) * 0.02)}
    motions = sparse_motions(regions, regions, None, 16, 20)
    assert torch.allclose(motions, coordinate_grid(16, 20).expand(2, 5, -1, -1, -1), atol=1e-5)
    ident_bg = torch.eye(3).expand(2, 3, 3)
    motions = sparse_motions(regions, regions, ident_bg, 16, 20)
    assert torch.allclose(motions, coordinate_grid(16, 20).expand(2, 5, -1, -1, -1), atol=1e-5)
    assert torch.allclose(warp(img, motions[:, 3]), img, atol=1e-5)


def test_a_shifted_region_moves_the_image_by_its_shift():
    img = torch.zeros(1, 1, 16, 16)
    img[0, 0, 4, 6] = 1.0
    src = {"shift": torch.tensor([[[0.0, 0.0]]]), "affine": torch.eye(2).view(1, 1, 2, 2)}
    drv = {"shift": torch.tensor([[[0.25, 0.5]]]), "affine": torch.eye(2).view(1, 1, 2, 2)}  # 2 px right, 4 down
    out = warp(img, sparse_motions(src, drv, None, 16, 16)[:, 1])
    assert out[0, 0, 8, 8] == pytest.approx(1.0, abs=1e-5) and out.sum() == pytest.approx(1.0, abs=1e-5)


def test_equivariance_transform_jacobian_matches_autograd():
    torch.manual_seed(1)
    tr = RandomTransform(3, sigma_affine=0.05, sigma_tps=0.005, points_tps=5)
    z = (torch.rand(3, 7, 2) * 2 - 1).requires_grad_(True)
    out, J = tr.warp_coordinates(z), tr.jacobian(z)
    for i in range(2):
        g = torch.autograd.grad(out[..., i].sum(), z, retain_graph=True)[0]
        assert torch.allclose(g, J[..., i, :], atol=1e-5)


def test_akd_and_mkr_on_hand_made_keypoints():
    true = torch.tensor([[[0.0, 0.0], [0.5, 0.5], [-0.5, 0.25]]])
    gen = true + torch.tensor([[[0.25, 0.0], [0.0, 0.0], [0.0, -0.5]]])  # off by 2, 0 and 4 pixels at 16x16
    assert akd(gen, true, 16) == pytest.approx(2.0)
    assert akd(true, true, 16) == 0.0
    real = true + torch.tensor([[[0.05, 0.0], [0.0, 0.05], [0.3, 0.0]]])  # the third is not found in the real frame
    # found in the real frame: parts 0 and 1; of these, part 0 is missing in the generated frame
    assert mkr(gen, real, true, radius=0.125) == pytest.approx(0.5)
    assert mkr(true, real, true, radius=0.125) == 0.0


def test_articulated_videos_are_deterministic_per_seed():
    a = generate_articulated(3, identities=2, train_per_identity=1, test_per_identity=1, frames=4, size=32)
    b = generate_articulated(3, identities=2, train_per_identity=1, test_per_identity=1, frames=4, size=32)
    c = generate_articulated(4, identities=2, train_per_identity=1, test_per_identity=1, frames=4, size=32)
    for split in ("train", "test"):
        for u, v in zip(a[split], b[split]):
            assert torch.equal(u, v)
    assert not torch.equal(a["train"][0], c["train"][0])
    x, y, centres = a["train"]
    assert x.shape == (2, 3, 4, 32, 32) and y.tolist() == [0, 1] and centres.shape == (2, 4, 5, 2)
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert centres.abs().max() < 1.0  # every part centre is inside the frame
    # the figure moves: frames differ, and so do the part centres
    assert (x[:, :, 1:] - x[:, :, :1]).abs().mean() > 0.01
    assert (centres[:, 1:] - centres[:, :1]).abs().max() > 0.05


def test_articulated_dataset_has_centres_for_every_frame():
    ds = load_dataset("articulated_smoke")
    for split in ("train", "test"):
        x = getattr(ds, split).x
        assert ds.extra["centres"][split].shape == (len(x), x.shape[2], 5, 2)
    assert ds.extra["video"] and ds.num_classes == 4


@pytest.mark.parametrize("options", [{}, {"affine": "jacobian"}, {"background": "none"},
                                     {"affine": "jacobian", "background": "none", "heatmap": "keypoint"}])
def test_every_model_option_animates_and_trains(options):
    torch.manual_seed(0)
    model = build_model("motion_transfer", in_channels=3, num_classes=2, input_size=32, regions=3, width=4, blocks=2,
                        **options)
    s, d = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    out = model.animate(s, d)
    assert out["prediction"].shape == (2, 3, 32, 32)
    assert (out["bg"] is None) == (options.get("background") == "none")
    loss = (out["prediction"] - d).abs().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_unknown_model_option_is_one_clear_error():
    from common.errors import SuiteError
    with pytest.raises(SuiteError, match="unknown affine 'svd'"):
        build_model("motion_transfer", in_channels=3, num_classes=2, input_size=32, affine="svd")


def _write_frames(folder, frames):
    from PIL import Image
    folder.mkdir(parents=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / f"{i:07d}.png")


def test_paper_video_loaders_read_the_official_layouts(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 40, 40, 3), dtype=np.uint8)
    root = tmp_path / "data"
    base = root / PAPER_LAYOUTS["taichi"]
    _write_frames(base / "train" / "video_a", frames)  # a folder of frames
    Image.fromarray(np.concatenate(list(frames), axis=1)).save(base / "train" / "video_b.png")  # a frame strip
    imgs = [Image.fromarray(f) for f in frames]
    (base / "test").mkdir()
    imgs[0].save(base / "test" / "video_c.gif", save_all=True, append_images=imgs[1:])  # a gif
    assert read_video(base / "train" / "video_a").shape == (5, 40, 40, 3)
    np.testing.assert_allclose(read_video(base / "train" / "video_b.png"), frames / 255, atol=1e-6)
    assert read_video(base / "test" / "video_c.gif").shape[0] == 5
    ds = load_paper_videos("taichi", root, size=16, frames=4)
    assert ds.train.x.shape == (2, 3, 4, 16, 16) and ds.test.x.shape == (1, 3, 4, 16, 16)
    assert torch.allclose(ds.train.x[0], ds.train.x[1], atol=1e-6)  # folder and strip hold the same frames
    assert ds.extra["centres"]["train"] is None


def test_missing_paper_dataset_is_one_clear_error_naming_the_expected_folders(tmp_path):
    with pytest.raises(DatasetMissing) as e:
        load_dataset("mgif", tmp_path)
    assert "moving-gif/train/" in str(e.value) and "moving-gif/test/" in str(e.value)


# --- the authors' VGG-19 perceptual pyramid (paper scale) ----------------------------------------------------------
def vgg19_meta():
    import torchvision
    with torch.device("meta"):
        return torchvision.models.vgg19(weights=None)


@pytest.fixture(scope="module")
def vgg19_file(tmp_path_factory):
    """A random torchvision vgg19 state dict holding only the `features.*` entries up to conv5_1 (features 28, the
    last before relu5_1), scaled so that activations stay of order one; (path, state)."""
    gen = torch.Generator().manual_seed(5)
    state = {}
    for k, v in vgg19_meta().state_dict().items():
        if k.startswith("features.") and int(k.split(".")[1]) <= 28:
            fan_in = v[0].numel() if v.dim() > 1 else 1
            state[k] = torch.randn(v.shape, generator=gen) * (2 / fan_in) ** 0.5
    path = tmp_path_factory.mktemp("vgg19") / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path, state


def test_vgg19_pyramid_features_are_the_authors_layers_frozen_in_eval_mode(vgg19_file):
    from common.models.perceptual import VGG19_PYRAMID_LAYERS, load_vgg_features
    features = load_vgg_features(vgg19_file[0], 19, tuple(VGG19_PYRAMID_LAYERS), normalize=True)
    assert list(VGG19_PYRAMID_LAYERS.values()) == ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    assert len(features.layers) == 30  # truncated after relu5_1
    features.train()
    assert not features.training and all(not p.requires_grad for p in features.parameters())
    out = features(torch.rand(2, 3, 32, 32))
    assert [tuple(o.shape) for o in out] == [(2, 64, 32, 32), (2, 128, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4),
                                             (2, 512, 2, 2)]
    # each level of a 32x32 pyramid reaches the layers whose activation is not empty (relu5_1 needs 16 pixels)
    assert [features.reachable(s, s) for s in (32, 16, 8, 4, 1)] == [5, 5, 4, 3, 1]


def test_vgg19_perceptual_pyramid_equals_an_independent_computation(vgg19_file):
    from papers.mraa.method import pyramid_perceptual
    from common.models.perceptual import VGG19_PYRAMID_LAYERS, load_vgg_features
    path, state = vgg19_file
    features = load_vgg_features(path, 19, tuple(VGG19_PYRAMID_LAYERS), normalize=True)
    torch.manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    weights = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pyramid_perceptual(features, a, a, weights).item() == 0.0
    # by hand: torchvision's vgg19 with the same weights; ImageNet normalisation; activations after features[1], [6],
    # [11], [20], [29]; pyramid levels as 2^k x 2^k block means; sum over levels and reachable layers of w * mean |.|
    reference = vgg19_meta()
    reference.load_state_dict(state, strict=False, assign=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def activations(x):
        x, out = (x - mean) / std, []
        for i in range(30):
            if isinstance(reference.features[i], torch.nn.MaxPool2d) and min(x.shape[-2:]) < 2:
                break  # deeper layers have an empty activation at this level
            x = reference.features[i](x)
            if i in (1, 6, 11, 20, 29):
                out.append(x.clone())
        return out

    expected, terms = 0.0, 0
    with torch.no_grad():
        for k in range(4):  # scales 1, 1/2, 1/4, 1/8: 32, 16, 8, 4 pixels
            fa = activations(torch.nn.functional.avg_pool2d(a, 2 ** k) if k else a)
            fb = activations(torch.nn.functional.avg_pool2d(b, 2 ** k) if k else b)
            expected += sum(w * (u - v).abs().mean() for w, u, v in zip(weights, fa, fb))
            terms += len(fa)
    assert terms == 5 + 5 + 4 + 3
    got = pyramid_perceptual(features, a, b, weights)
    assert got.item() > 0 and torch.allclose(got, expected, rtol=1e-5)
    # gradients reach the generated frame only
    image = a.clone().requires_grad_(True)
    pyramid_perceptual(features, image, b, weights).backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    assert all(p.grad is None for p in features.parameters())


def test_missing_or_damaged_vgg19_weights_are_one_clear_error(tmp_path):
    from common.errors import SuiteError
    from common.models.perceptual import VGG19_PYRAMID_LAYERS, load_vgg_features
    with pytest.raises(SuiteError, match=r"VGG-19 weights at .*nothere\.pth.*vgg19-dcbb9e9d\.pth"):
        load_vgg_features(tmp_path / "nothere.pth", 19, tuple(VGG19_PYRAMID_LAYERS), normalize=True)
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    with pytest.raises(SuiteError, match="partial.pth is not a torchvision vgg19 state dict"):
        load_vgg_features(tmp_path / "partial.pth", 19, tuple(VGG19_PYRAMID_LAYERS), normalize=True)


def smoke_spec(**method):
    return {"dataset": {"name": "articulated_smoke"}, "partition": {"clients": 1, "scheme": "iid"}, "seed": 0,
            "method": {"name": "motion_transfer", "evaluator_steps": 5, **method},
            "model": {"name": "motion_transfer", "regions": 3, "width": 4, "blocks": 2},
            "training": {"batch_size": 4, "client_fraction": 1.0, "keep_optimizer": True, "local_epochs": 1,
                         "local_steps": 1, "lr": 0.001, "optimizer": "adamw", "rounds": 1}}


def test_mraa_trains_with_the_vgg19_pyramid_and_needs_its_weights_file(vgg19_file, tmp_path):
    from common.errors import SuiteError
    from common.train import execute
    path = vgg19_file[0]
    vgg = execute(smoke_spec(reconstruction="vgg19", perceptual=[10, 10, 10, 10, 10],
                             perceptual_weights=path.name), data_root=str(path.parent), progress=False)
    pixel = execute(smoke_spec(), data_root=str(path.parent), progress=False)
    loss_vgg, loss_pixel = vgg["metrics"]["train_loss"][0], pixel["metrics"]["train_loss"][0]
    assert vgg["status"] == "completed"
    assert math.isfinite(loss_vgg) and loss_vgg != loss_pixel
    with pytest.raises(SuiteError, match=r"VGG-19 weights at .*vgg19-dcbb9e9d\.pth"):
        execute(smoke_spec(reconstruction="vgg19"), data_root=str(tmp_path), progress=False)


def test_reconstruction_options_are_checked():
    from common.errors import SuiteError
    from papers.mraa.method import MotionTransferTraining
    assert MotionTransferTraining(reconstruction="vgg19").perceptual == [10.0] * 5
    assert MotionTransferTraining().perceptual == 10.0  # the pixel pyramid's weight per level, as before
    with pytest.raises(SuiteError, match="unknown reconstruction 'vgg16'"):
        MotionTransferTraining(reconstruction="vgg16")
    with pytest.raises(SuiteError, match="a list of 5"):
        MotionTransferTraining(reconstruction="vgg19", perceptual=[10, 10])
    with pytest.raises(SuiteError, match="one weight per pyramid level"):
        MotionTransferTraining(perceptual=[10, 10, 10, 10, 10])


def test_paper_scale_uses_the_authors_perceptual_pyramid_and_the_offline_scales_do_not():
    from common.experiments import paper_runs
    for spec in paper_runs("mraa", "paper").values():
        assert spec["method"] == {"name": "motion_transfer", "reconstruction": "vgg19",
                                  "perceptual": [10, 10, 10, 10, 10], "perceptual_weights": "vgg19-dcbb9e9d.pth"}
    for scale in ("mini", "smoke"):
        assert all("reconstruction" not in spec["method"] for spec in paper_runs("mraa", scale).values())
