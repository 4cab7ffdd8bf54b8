"""Videos for motion transfer (MRAA): generated articulated figures (offline) and the paper's datasets.

Every video dataset is a `Dataset` whose x is float (N, 3, T, H, W) in [0, 1] (channels first, so a model sees
3 input channels and `input_size` W) and whose y is the video's identity (the synthetic figure's, or the video's
index for real datasets). `extra["centres"]` holds, per split, the ground-truth part centres (N, T, P, 2) in
grid_sample coordinates ([-1, 1], x then y) where they are known (the generated videos), else None.

- `articulated` (mini) / `articulated_smoke`: 2-D figures of `PARTS` rigid parts (a torso, two upper arms, two
  forearms) that rotate about their joints, drawn over a moving background. An identity fixes the figure's
  proportions and its texture (a crop of one of scikit-image's bundled photographs, per part a different crop and
  tint); a video draws a figure of one identity with its own joint-angle trajectories (sinusoids of random
  frequency, phase and amplitude), a slowly drifting and turning torso, and a background (a crop of one of
  scikit-image's grey-level textures, tinted) under its own global affine motion (translation, rotation, scale),
  so that a background model matters. Rendering is by inverse mapping at 2x resolution, then 2x2 averaging (anti-
  aliasing). Each part's texture is attached to the part, so a part moves rigidly, as the region model assumes.
  Seeded: the same `seed` gives the same videos, bit for bit.
- Paper scale (`taichi`, `ted`, `vox`, `mgif`): the official frame layouts under `data_root` (see
  `PAPER_LAYOUTS`): `<root>/{train,test}/<video>` where a video is a folder of frames (`*.png` / `*.jpg`), one image
  holding the frames side by side (`<video>.png`, frames of width = height), or a `.gif`. Frames are resized to
  `PAPER_SIZE` and `PAPER_FRAMES` frames are taken at even steps. Never downloaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from common.data import Dataset, Split, register
from common.errors import DatasetMissing, SuiteError

ARTICULATED_SEED = 20261206  # the generator's seed: the mini dataset is a fixed property of the suite
PARTS = ("torso", "left upper arm", "left forearm", "right upper arm", "right forearm")
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "colorwheel",
          "retina")
BACKGROUNDS = ("brick", "grass", "gravel", "camera", "moon", "coins")


def _texture_sources():
    import skimage.data as d
    photos = [np.asarray(getattr(d, n)()[..., :3], dtype=np.float32) / 255 for n in PHOTOS]
    grounds = [np.asarray(getattr(d, n)(), dtype=np.float32) / 255 for n in BACKGROUNDS]
    return photos, grounds


def _crop(img: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = int(rng.integers(0, h - size)), int(rng.integers(0, w - size))
    return img[y:y + size, x:x + size]


def _sample(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest texel of `tex` (S, S, 3) at texture coordinates u, v in [0, 1] (wrapped)."""
    s = tex.shape[0]
    iu = np.mod((u * (s - 1)).astype(np.int64), s)
    iv = np.mod((v * (s - 1)).astype(np.int64), s)
    return tex[iv, iu]


def make_identity(rng: np.random.Generator, photos, tex_size: int = 48) -> dict:
    """A figure: proportions (in units of the frame's half-width) and a texture crop and tint per part."""
    photo = photos[int(rng.integers(len(photos)))]
    torso = (rng.uniform(0.18, 0.26), rng.uniform(0.26, 0.36))  # half-width, half-height
    upper = (rng.uniform(0.17, 0.23), rng.uniform(0.08, 0.11))  # half-length, half-thickness
    fore = (rng.uniform(0.14, 0.20), rng.uniform(0.07, 0.10))
    textures = []
    for _ in PARTS:
        tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
        textures.append(np.clip(_crop(photo, rng, tex_size) * tint + rng.uniform(0, 0.2), 0, 1))
    return {"torso": torso, "upper": upper, "fore": fore, "textures": textures}


def _rot(a: float) -> np.ndarray:
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])


def figure_pose(ident: dict, t: np.ndarray, params: dict) -> list[tuple[np.ndarray, float, tuple]]:
    """(centre, angle, (half-length along the part's x, half-thickness)) of every part at times t (scalar)."""
    tx, ty = params["drift"] * np.sin(params["drift_freq"] * t + params["drift_phase"])
    torso_c = np.array([tx, ty])
    torso_a = params["lean"] * math.sin(params["lean_freq"] * t)
    hw, hh = ident["torso"]
    R = _rot(torso_a)
    parts = [(torso_c, torso_a, (hw, hh))]
    for side, sign in ((0, -1.0), (1, 1.0)):
        shoulder = torso_c + R @ np.array([sign * hw * 0.9, -hh * 0.8])
        a1 = torso_a + (0 if sign > 0 else math.pi) + sign * (params["amp"][side][0] * math.sin(
            params["freq"][side][0] * t + params["phase"][side][0]) + params["rest"][side][0])
        ul, ut = ident["upper"]
        d1 = np.array([math.cos(a1), math.sin(a1)])
        upper_c = shoulder + ul * d1
        elbow = shoulder + 2 * ul * d1
        a2 = a1 + sign * (params["amp"][side][1] * math.sin(params["freq"][side][1] * t + params["phase"][side][1])
                          + params["rest"][side][1])
        fl, ft = ident["fore"]
        fore_c = elbow + fl * np.array([math.cos(a2), math.sin(a2)])
        parts += [(upper_c, a1, (ul, ut)), (fore_c, a2, (fl, ft))]
    return parts


def render_video(ident: dict, ground: np.ndarray, rng: np.random.Generator, frames: int, size: int):
    """A (T, 3, size, size) video of one identity over a moving background, and its (T, P, 2) part centres."""
    p = {"drift": rng.uniform(0.05, 0.15, 2), "drift_freq": rng.uniform(0.2, 0.6), "drift_phase": rng.uniform(0, 6.3, 2),
         "lean": rng.uniform(0.0, 0.3), "lean_freq": rng.uniform(0.3, 0.9),
         "amp": rng.uniform(0.4, 1.0, (2, 2)), "freq": rng.uniform(0.3, 0.8, (2, 2)),
         "phase": rng.uniform(0, 6.3, (2, 2)), "rest": rng.uniform(0.3, 1.2, (2, 2))}
    tint = rng.uniform(0.4, 1.0, 3).astype(np.float32)
    bg_shift, bg_rot, bg_scale = rng.uniform(-0.08, 0.08, 2), rng.uniform(-0.06, 0.06), rng.uniform(-0.04, 0.04)
    bg_off = rng.uniform(0.2, 0.8, 2)
    n = 2 * size  # rendered at 2x, then averaged
    lin = (np.arange(n) + 0.5) / n * 2 - 1
    gx, gy = np.meshgrid(lin, lin)
    pts = np.stack([gx, gy], -1)  # (n, n, 2), x then y
    video = np.empty((frames, n, n, 3), np.float32)
    centres = np.empty((frames, len(PARTS), 2), np.float32)
    for f in range(frames):
        # background: frame coordinates -> texture coordinates through its own affine motion
        A = (1 + bg_scale * f) * _rot(bg_rot * f)
        q = pts @ A.T + bg_shift * f
        img = ground[(np.mod(((q[..., 1] * 0.25 + bg_off[1]) * (ground.shape[0] - 1)), ground.shape[0])).astype(int),
                     (np.mod(((q[..., 0] * 0.25 + bg_off[0]) * (ground.shape[1] - 1)), ground.shape[1])).astype(int)]
        img = img[..., None] * tint
        for k, (c, a, (hl, ht)) in enumerate(figure_pose(ident, np.float64(f), p)):
            local = (pts - c) @ _rot(a)  # rotate by -a: part coordinates
            inside = (np.abs(local[..., 0]) <= hl) & (np.abs(local[..., 1]) <= ht)
            u = (local[..., 0] / hl + 1) / 2
            v = (local[..., 1] / ht + 1) / 2
            img = np.where(inside[..., None], _sample(ident["textures"][k], u, v), img)
            centres[f, k] = c
        video[f] = img
    video = video.reshape(frames, size, 2, size, 2, 3).mean((2, 4))
    return np.clip(video, 0, 1).transpose(0, 3, 1, 2), centres


def generate_articulated(seed: int, identities: int, train_per_identity: int, test_per_identity: int, frames: int,
                         size: int) -> dict:
    """The videos of `identities` figures: x (N, 3, T, H, W) float32, y identity, centres (N, T, P, 2)."""
    rng = np.random.default_rng(seed)
    photos, grounds = _texture_sources()
    idents = [make_identity(rng, photos) for _ in range(identities)]
    out = {}
    for split, per in (("train", train_per_identity), ("test", test_per_identity)):
        xs, ys, cs = [], [], []
        for i in range(per):
            for k, ident in enumerate(idents):
                ground = _crop(grounds[int(rng.integers(len(grounds)))], rng, 256)
                v, c = render_video(ident, ground, rng, frames, size)
                xs.append(v.transpose(1, 0, 2, 3))
                ys.append(k)
                cs.append(c)
        out[split] = (torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64), torch.from_numpy(np.stack(cs)))
    return out


ARTICULATED = {  # name -> (identities, train videos per identity, test videos per identity, frames, size)
    "articulated": (8, 12, 3, 8, 32),
    "articulated_smoke": (4, 3, 2, 6, 32),
}


def _articulated(name: str) -> Dataset:
    from common.data import cached
    ids, tr, te, frames, size = ARTICULATED[name]
    data = cached(name, ("scikit-image", "numpy"),
                  lambda: {s: v for s, v in generate_articulated(ARTICULATED_SEED, ids, tr, te, frames, size).items()},
                  key=f"v1-{ARTICULATED_SEED}")
    (xtr, ytr, ctr), (xte, yte, cte) = data["train"], data["test"]
    return Dataset(name, Split(xtr, ytr), Split(xte, yte), ids,
                   f"articulated figures ({ids} identities, {len(ytr)} train / {len(yte)} test videos of {frames} "
                   f"frames, {size}x{size}; generated, seed {ARTICULATED_SEED})",
                   extra={"centres": {"train": ctr, "test": cte}, "parts": PARTS, "video": True})


register("articulated")(lambda root: _articulated("articulated"))
register("articulated_smoke")(lambda root: _articulated("articulated_smoke"))


# --- the paper's datasets (paper scale) ------------------------------------------------------------------------
PAPER_LAYOUTS = {  # loader -> folder under data_root (the official configs' root_dir)
    "taichi": "taichi-png",
    "ted": "TED384-v2",
    "vox": "vox-png",
    "mgif": "moving-gif",
}
PAPER_SIZE, PAPER_FRAMES = 64, 8
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")


def missing_files(name: str, root: Path) -> list[str]:
    if name not in PAPER_LAYOUTS:
        return []
    base = Path(root) / PAPER_LAYOUTS[name]
    return [str(base / s) + "/" for s in ("train", "test") if not (base / s).is_dir() or not any((base / s).iterdir())]


def read_video(path: Path) -> np.ndarray:
    """Frames (T, H, W, 3) float32 in [0, 1] of one video in the official layouts: a folder of frames, one image
    with the frames side by side (each frame as wide as it is high), or a gif."""
    from PIL import Image, ImageSequence
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
        return np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in files])
    if path.suffix.lower() == ".gif":
        with Image.open(path) as im:
            return np.stack([np.asarray(fr.convert("RGB"), np.float32) / 255 for fr in ImageSequence.Iterator(im)])
    img = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255
    h, w, _ = img.shape
    if w % h:
        raise SuiteError(f"{path}: a frame strip must be a whole number of square frames side by side ({w}x{h})")
    return img.reshape(h, w // h, h, 3).transpose(1, 0, 2, 3)


def _resize(frames: np.ndarray, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(t, size=(size, size), mode="area").clamp(0, 1)


def load_paper_videos(name: str, root: Path, size: int = PAPER_SIZE, frames: int = PAPER_FRAMES) -> Dataset:
    missing = missing_files(name, root)
    if missing:
        raise DatasetMissing(f"dataset '{name}' needs " + ", ".join(missing) + f" under data_root '{root}' (each "
                             f"split a folder of videos: frame folders, frame strips or gifs, as the authors' "
                             f"preprocessing writes them); see README.md, 'Paper scale data'")
    base = Path(root) / PAPER_LAYOUTS[name]
    splits = {}
    names: list[str] = []
    for split in ("train", "test"):
        xs, ys = [], []
        for path in sorted(p for p in (base / split).iterdir() if p.is_dir() or p.suffix.lower() in
                           (*FRAME_SUFFIXES, ".gif")):
            v = read_video(path)
            if len(v) < 2:
                continue
            idx = np.linspace(0, len(v) - 1, frames).round().astype(int)
            xs.append(_resize(v[idx], size).permute(1, 0, 2, 3))
            names.append(path.stem)
            ys.append(len(names) - 1)
        if not xs:
            raise DatasetMissing(f"dataset '{name}': no video with at least 2 frames in {base / split}")
        splits[split] = Split(torch.stack(xs), torch.tensor(ys))
    return Dataset(name, splits["train"], splits["test"], len(names),
                   f"{name} ({len(splits['train'])} train / {len(splits['test'])} test videos, {frames} frames at "
                   f"{size}x{size})", extra={"centres": {"train": None, "test": None}, "parts": (), "video": True})


for _name in PAPER_LAYOUTS:
    register(_name)(lambda root, _n=_name: load_paper_videos(_n, root))
