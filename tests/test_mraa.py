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
