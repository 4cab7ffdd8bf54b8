"""Person re-identification data: generated identities seen by several cameras (the FedReID analog), and the
paper-scale loader of the nine ReID benchmarks' usual layouts.

A ReID dataset here is a multi-domain `Dataset` whose domains are the clients' datasets (one client per domain,
partition scheme `domain`): the training split's labels are identity ids, disjoint across domains (their union is
`num_classes`); the test split holds other identities (never trained on) with `extra["test_camera"]` (camera of each
test image) and `extra["test_query"]` (True: a query image, False: a gallery image); `extra["public_x"]` is an
unlabelled shared set (the server's knowledge-distillation data, CUHK02 in the paper), `extra["retrieval"]` tells
the engine to evaluate by retrieval (common/retrieval.py), `extra["train_ids"]` gives each domain's number of
training identities.

Generated identities (`reid_synth`, `reid_synth_smoke`), 3x32x32 images:
- an identity is a small figure (head, torso, legs) on a background: skin/hair tone, top and bottom colours from its
  dataset's palette (each dataset has its own clothing palette: a different "city and season"), a top pattern
  (plain, horizontal or vertical stripes, checks) with its own colour, an optional bag on one side, body height and
  width;
- a camera (each dataset has its own, 2-4 of them) changes the viewpoint (horizontal position, scale, a view from the
  other side that moves the bag and mirrors the pattern), the illumination (per-channel gain: colour cast, brightness)
  and the background (colour and texture); every image jitters pose, position and light, may be partly occluded,
  and gets pixel noise;
- each dataset adds its own style on top (a colour cast shared by its cameras, blur or contrast), so the clients'
  data differ in appearance as the nine ReID benchmarks do.
Retrieval is across cameras: a gallery image of the query's identity in the query's own camera is "junk" (left
out), as in Market-1501's protocol.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from common.data import Dataset, Split, cached, register
from common.errors import DatasetCorrupt, DatasetMissing

RECIPE = "reid-synth-v1"
SEED = 20200811
SIZE = 32

# name: (training identities, test identities, cameras, images per identity and camera in training, palette,
#        style); the paper's nine datasets range from a few hundred images (3DPeS, iLIDS, PRID, VIPeR) to tens of
#        thousands (MSMT17, Market-1501, DukeMTMC-reID)
MINI_CLIENTS = {
    "market": (64, 24, 4, 2, "summer", dict(cast=(1.00, 1.00, 1.00), blur=0.0, contrast=1.0)),
    "duke": (48, 24, 4, 2, "winter", dict(cast=(0.85, 0.95, 1.15), blur=0.3, contrast=0.9)),
    "cuhk03": (32, 16, 2, 3, "campus", dict(cast=(1.10, 1.00, 0.85), blur=0.0, contrast=1.1)),
    "viper": (10, 12, 2, 1, "street", dict(cast=(1.05, 1.05, 0.95), blur=0.6, contrast=0.85)),
    "prid": (8, 12, 2, 2, "summer", dict(cast=(0.90, 1.10, 0.95), blur=0.4, contrast=1.0)),
    "ilids": (6, 12, 2, 2, "winter", dict(cast=(1.10, 0.90, 1.00), blur=0.0, contrast=0.9)),
}
SMOKE_CLIENTS = {name: (n, 4, 2, 1, palette, style)  # the mini datasets, tiny
                 for (name, (_, _, _, _, palette, style)), n in zip(MINI_CLIENTS.items(), (8, 6, 4, 3, 3, 3))}
TEST_PER_CAMERA = 2  # test images per identity and camera: one query (cameras 0 and 1) and the gallery
PUBLIC = (40, 2, 2)  # the shared set: identities, cameras, images per identity and camera (another dataset, CUHK02)

# clothing palettes: mean RGB of tops and bottoms and their spread
PALETTES = {
    "summer": dict(top=(0.75, 0.55, 0.45), bottom=(0.45, 0.45, 0.55), spread=0.28),
    "winter": dict(top=(0.30, 0.30, 0.35), bottom=(0.25, 0.25, 0.30), spread=0.20),
    "campus": dict(top=(0.55, 0.60, 0.70), bottom=(0.30, 0.30, 0.45), spread=0.25),
    "street": dict(top=(0.60, 0.35, 0.35), bottom=(0.35, 0.35, 0.30), spread=0.25),
    "public": dict(top=(0.50, 0.50, 0.50), bottom=(0.40, 0.40, 0.40), spread=0.30),
}


def identity(rng: np.random.Generator, palette: str) -> dict:
    p = PALETTES[palette]
    return dict(skin=rng.uniform(0.35, 0.85) * np.array([1.0, 0.8, 0.65]),
                hair=rng.uniform(0.05, 0.6) * np.array([1.0, 0.85, 0.7]),
                top=np.clip(np.array(p["top"]) + rng.normal(0, p["spread"], 3), 0, 1),
                bottom=np.clip(np.array(p["bottom"]) + rng.normal(0, p["spread"], 3), 0, 1),
                pattern=int(rng.integers(4)), pattern_colour=rng.uniform(0, 1, 3),
                bag=int(rng.integers(3)), bag_colour=rng.uniform(0, 1, 3),
                height=rng.uniform(0.8, 1.0), width=rng.uniform(0.8, 1.25))


def camera(rng: np.random.Generator) -> dict:
    return dict(x=rng.uniform(-4, 4), scale=rng.uniform(0.8, 1.05), back=bool(rng.integers(2)),
                gain=rng.uniform(0.8, 1.2, 3), light=rng.uniform(0.8, 1.15),
                bg=rng.uniform(0.1, 0.9, 3), bg_texture=rng.uniform(0.02, 0.2))


def render(ident: dict, cam: dict, style: dict, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One image (3, size, size) in [0, 1] of `ident` seen by `cam` in a dataset of `style`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    bg = cam["bg"][:, None, None] * (1 + ndimage.gaussian_filter(rng.standard_normal((size, size)), 2)
                                     * cam["bg_texture"] * 4)
    img = np.broadcast_to(bg, (3, size, size)).copy()
    s = cam["scale"] * ident["height"] * rng.uniform(0.95, 1.05) * size / 32
    cx = size / 2 + cam["x"] + rng.normal(0, 1.2)
    top_y = size / 2 - 14 * s + rng.normal(0, 0.8)
    w = 4.5 * ident["width"] * s
    # legs (bottom colour), torso (top colour, pattern), head (skin, hair)
    legs = (yy >= top_y + 15 * s) & (yy < top_y + 28 * s) & (np.abs(xx - cx) < w * 0.9) & \
        ~((np.abs(xx - cx) < 0.8 * s) & (yy > top_y + 18 * s))
    torso = (yy >= top_y + 6 * s) & (yy < top_y + 15.5 * s) & (np.abs(xx - cx) < w)
    head = (xx - cx) ** 2 + (yy - (top_y + 3.2 * s)) ** 2 < (2.8 * s) ** 2
    hair = head & (yy < top_y + 2.2 * s)
    mirror = -1 if cam["back"] else 1
    u, v = mirror * (xx - cx), yy - top_y
    pat = ident["pattern"]
    stripes = {0: np.zeros_like(xx, bool), 1: (np.floor(v / (2 * s)) % 2) == 0,
               2: (np.floor((u + 20) / (2 * s)) % 2) == 0,
               3: ((np.floor(v / (2 * s)) + np.floor((u + 20) / (2 * s))) % 2) == 0}[pat]
    for mask, colour in ((legs, ident["bottom"]), (torso, ident["top"]), (torso & stripes, ident["pattern_colour"]),
                         (head, ident["skin"]), (hair, ident["hair"])):
        img[:, mask] = colour[:, None]
    if ident["bag"]:
        side = (1 if ident["bag"] == 1 else -1) * mirror
        bag = (np.abs(xx - (cx + side * (w + 1.8 * s))) < 1.8 * s) & (yy >= top_y + 9 * s) & (yy < top_y + 15 * s)
        img[:, bag] = ident["bag_colour"][:, None]
    if rng.random() < 0.2:  # a partial occlusion
        oy = rng.integers(size // 2, size - 6)
        img[:, oy:oy + 6, :] = rng.uniform(0, 1, 3)[:, None, None]
    # illumination: the camera's gain and light, the dataset's cast and contrast, a per-image jitter
    gain = cam["gain"] * cam["light"] * np.array(style["cast"]) * rng.uniform(0.9, 1.1)
    img = img * gain[:, None, None]
    img = (img - 0.5) * style["contrast"] + 0.5
    if style["blur"]:
        img = ndimage.gaussian_filter(img, (0, style["blur"], style["blur"]))
    img = img + rng.normal(0, 0.05, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def generate(clients: dict, seed: int = SEED) -> dict:
    """Tensors of the generated benchmark: train/test x, y, domain; test camera and query flags; the public set."""
    rng = np.random.default_rng(seed)
    out = {k: [] for k in ("x", "y", "d", "c", "tx", "ty", "td", "tc", "tq")}
    next_train, next_test = 0, 0
    train_ids = []
    for d, (name, (n_train, n_test, n_cams, per_cam, palette, style)) in enumerate(clients.items()):
        cams = [camera(rng) for _ in range(n_cams)]
        for _ in range(n_train):
            ident = identity(rng, palette)
            for c, cam in enumerate(cams):
                for _ in range(per_cam):
                    out["x"].append(render(ident, cam, style, rng))
                    out["y"].append(next_train)
                    out["d"].append(d)
                    out["c"].append(c)
            next_train += 1
        train_ids.append(n_train)
        for _ in range(n_test):
            ident = identity(rng, palette)
            for c, cam in enumerate(cams):
                for i in range(TEST_PER_CAMERA):
                    out["tx"].append(render(ident, cam, style, rng))
                    out["ty"].append(next_test)
                    out["td"].append(d)
                    out["tc"].append(c)
                    out["tq"].append(i == 0 and c < 2)  # one query per identity from each of the first two cameras
            next_test += 1
    n_ids, n_cams, per_cam = PUBLIC
    style = dict(cast=(1.0, 1.0, 1.0), blur=0.2, contrast=1.0)
    cams = [camera(rng) for _ in range(n_cams)]
    public = [render(identity(rng, "public"), cam, style, rng) for _ in range(n_ids) for cam in cams
              for _ in range(per_cam)]
    t = lambda v, dt=torch.int64: torch.tensor(np.array(v), dtype=dt)  # noqa: E731
    return {"x": torch.from_numpy(np.stack(out["x"])), "y": t(out["y"]), "domain": t(out["d"]),
            "camera": t(out["c"]), "test_x": torch.from_numpy(np.stack(out["tx"])), "test_y": t(out["ty"]),
            "test_domain": t(out["td"]), "test_camera": t(out["tc"]), "test_query": t(out["tq"], torch.bool),
            "public_x": torch.from_numpy(np.stack(public)), "train_ids": t(train_ids)}


def _dataset(name: str, clients: dict, g: dict, description: str) -> Dataset:
    extra = {"retrieval": True, "test_camera": g["test_camera"], "test_query": g["test_query"],
             "train_camera": g["camera"], "public_x": g["public_x"], "train_ids": g["train_ids"].tolist()}
    return Dataset(name, Split(g["x"], g["y"], g["domain"]), Split(g["test_x"], g["test_y"], g["test_domain"]),
                   int(g["y"].max()) + 1, description, extra, domains=tuple(clients))


def _describe(clients: dict) -> str:
    sizes = ", ".join(f"{n} {a}x{c}x{p}" for n, (a, _, c, p, _, _) in clients.items())
    return (f"generated person identities (3x32x32; clothing colours, pattern, bag, body shape per identity) seen by "
            f"2-4 cameras per dataset (viewpoint, illumination, background), {len(clients)} datasets with disjoint "
            f"identities (training identities x cameras x images per camera: {sizes}), test identities unseen in "
            f"training, one query per identity in each of the first two cameras")


@register("reid_synth")
def reid_synth(root=None) -> Dataset:
    g = cached("reid_synth", ("numpy", "scipy"), lambda: generate(MINI_CLIENTS), key=f"{RECIPE}-{SEED}")
    return _dataset("reid_synth", MINI_CLIENTS, g, _describe(MINI_CLIENTS))


@register("reid_synth_smoke")
def reid_synth_smoke(root=None) -> Dataset:
    g = cached("reid_synth_smoke", ("numpy", "scipy"), lambda: generate(SMOKE_CLIENTS), key=f"{RECIPE}-{SEED}")
    return _dataset("reid_synth_smoke", SMOKE_CLIENTS, g, _describe(SMOKE_CLIENTS))


# --- paper scale: the nine ReID benchmarks --------------------------------------------------------------------------
# domain name -> folder under <data_root>/reid/ (the authors' dataset names)
REID_DATASETS = {"market": "Market", "duke": "DukeMTMC-reID", "cuhk03": "cuhk03-np-detected", "cuhk01": "cuhk01",
                 "msmt17": "MSMT17", "viper": "viper", "prid": "prid", "3dpes": "3dpes", "ilids": "ilids"}
PUBLIC_DATASET = "cuhk02"
REID_HOWTO = ("Prepare the nine ReID datasets (and CUHK02, the shared distillation set) as the FedReID authors' "
              "data_preprocess scripts do (github.com/cap-ntu/FedReID), giving <data_root>/reid/<dataset>/pytorch/"
              "{train_all,query,gallery}/<identity>/<image>, or keep each in Market-1501's own layout "
              "<data_root>/reid/<dataset>/{bounding_box_train,query,bounding_box_test}/<id>_c<camera>..., file names "
              "starting with the identity and holding the camera as c<number> (Market-1501 0001_c1s1_000151_00.jpg, "
              "DukeMTMC-reID 0001_c2_f0046182.jpg, CUHK03-NP 0001_c1_1.png, MSMT17 converted 0000_c1_0001.jpg)")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_NAME = re.compile(r"^(-?\d+)_c(\d+)")
_CAM = re.compile(r"c(\d+)")
LAYOUTS = {"pytorch": ("pytorch/train_all", "pytorch/query", "pytorch/gallery"),
           "market": ("bounding_box_train", "query", "bounding_box_test")}


def parse_name(path: Path, folder_identity: str | None = None) -> tuple[int, int]:
    """(identity, camera) of a ReID image file: Market-1501 style `<id>_c<cam>...` names (Market-1501, DukeMTMC-reID,
    CUHK03-NP, MSMT17 converted; identity -1 marks junk, 0 distractors), or in the authors' layout the identity
    folder's name and the camera as the first `c<number>` of the file name (camera 0 when there is none)."""
    m = _NAME.match(path.name)
    if folder_identity is None:
        if not m:
            raise DatasetCorrupt(f"{path}: cannot read '<identity>_c<camera>' from the file name. {REID_HOWTO}.")
        return int(m.group(1)), int(m.group(2))
    cam = int(m.group(2)) if m else (int(c.group(1)) if (c := _CAM.search(path.stem)) else 0)
    return int(folder_identity), cam


def find_layout(root: Path, name: str) -> str | None:
    base = root / "reid" / name
    for layout, folders in LAYOUTS.items():
        if all((base / f).is_dir() for f in folders):
            return layout
    return None


def list_split(folder: Path, layout: str) -> list[tuple[Path, int, int]]:
    """(file, identity, camera) of every image in one split folder of either layout, sorted by path."""
    files = []
    if layout == "pytorch":
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            files += [(f, *parse_name(f, sub.name)) for f in sorted(sub.iterdir())
                      if f.suffix.lower() in IMAGE_SUFFIXES]
    else:
        files = [(f, *parse_name(f)) for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    return files


def _read_images(files: list[Path], size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image
    out = torch.empty(len(files), 3, *size)
    for i, f in enumerate(files):
        with Image.open(f) as im:
            arr = np.asarray(im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR), dtype=np.float32) / 255
        out[i] = torch.from_numpy(arr).permute(2, 0, 1)
    return out


def missing_files(name: str, root: Path) -> list[str]:
    if name != "reid9":
        return []
    return [f"reid/{n}/pytorch/train_all/ (or reid/{n}/bounding_box_train/)"
            for n in (*REID_DATASETS.values(), PUBLIC_DATASET) if find_layout(Path(root), n) is None]


def load_reid(root: Path, datasets: dict = REID_DATASETS, public: str = PUBLIC_DATASET,
              size: tuple[int, int] = (128, 64), dataset_name: str = "reid9") -> Dataset:
    """The ReID datasets under `<root>/reid/` (`datasets`: domain name -> folder; either layout, see REID_HOWTO) as
    one multi-domain dataset: training
    identities renumbered 0.. over all datasets (junk -1 dropped), test identities kept per dataset (-1: junk, left
    out of evaluation), query flags from the query folder, images resized to `size` (height, width)."""
    root = Path(root)
    names = list(datasets.values())
    missing = [n for n in (*names, public) if find_layout(root, n) is None]
    if missing:
        raise DatasetMissing(f"{dataset_name} is not in data_root '{root}': missing reid/{', reid/'.join(missing)}. "
                             f"{REID_HOWTO}.")
    x, y, d, c, tx, ty, td, tc, tq, train_ids = [], [], [], [], [], [], [], [], [], []
    offset = 0
    for k, n in enumerate(names):
        layout = find_layout(root, n)
        tr, q, g = (list_split(root / "reid" / n / f, layout) for f in LAYOUTS[layout])
        tr = [t for t in tr if t[1] >= 0]
        if not tr or not q:
            raise DatasetCorrupt(f"reid/{n} has no training or no query images. {REID_HOWTO}.")
        ids = {i: j for j, i in enumerate(sorted({t[1] for t in tr}))}
        x.append(_read_images([t[0] for t in tr], size))
        y += [offset + ids[t[1]] for t in tr]
        d += [k] * len(tr)
        c += [t[2] for t in tr]
        offset += len(ids)
        train_ids.append(len(ids))
        tx.append(_read_images([t[0] for t in q + g], size))
        ty += [t[1] for t in q + g]
        td += [k] * (len(q) + len(g))
        tc += [t[2] for t in q + g]
        tq += [True] * len(q) + [False] * len(g)
    layout = find_layout(root, public)
    pub = list_split(root / "reid" / public / LAYOUTS[layout][0], layout)
    g = {"x": torch.cat(x), "y": torch.tensor(y), "domain": torch.tensor(d), "camera": torch.tensor(c),
         "test_x": torch.cat(tx), "test_y": torch.tensor(ty), "test_domain": torch.tensor(td),
         "test_camera": torch.tensor(tc), "test_query": torch.tensor(tq), "train_ids": torch.tensor(train_ids),
         "public_x": _read_images([t[0] for t in pub], size)}
    clients = {d: None for d in datasets}
    return _dataset(dataset_name, clients, g, f"{len(names)} person re-identification datasets ({', '.join(names)}) "
                                              f"with {public} as the shared set, images {size[0]}x{size[1]}")


@register("reid9")
def reid9(root: Path) -> Dataset:
    return load_reid(Path(root))
