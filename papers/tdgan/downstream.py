"""TDGAN's downstream task: a segmenter trained on (synthetic or real) images of the centres' training label maps,
tested on every centre's real held-out images (common/segmentation.py: soft-Dice loss, Dice and HD95)."""
from __future__ import annotations

import numpy as np
import torch

from common.fl.engine import sub_seed
from common.models import build_model
from common.segmentation import evaluate_segmentation, segmentation_loss

# The segmenter and its schedule, as a method's `segmenter:` may override them.
SEGMENTER = {"width": 8, "depth": 3, "convs": 2, "norm": "bn", "epochs": 6, "batch_size": 32, "lr": 0.003}


def train_segmenter(images: torch.Tensor, masks: torch.Tensor, seed: int, settings: dict | None = None):
    """A U-Net trained with Adam on the soft-Dice loss of (images, masks); seeded (initialisation, batch order)."""
    s = {**SEGMENTER, **(settings or {})}
    torch.manual_seed(sub_seed(seed, 0x5E6))
    model = build_model("unet", in_channels=images.shape[1], num_classes=masks.shape[1], input_size=images.shape[-1],
                        width=s["width"], depth=s["depth"], convs=s["convs"], norm=s["norm"]).to(images.device)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    gen = torch.Generator().manual_seed(sub_seed(seed, 0x5E7))
    model.train()
    for _ in range(s["epochs"]):
        perm = torch.randperm(len(masks), generator=gen).to(images.device)
        for i in range(0, len(masks), s["batch_size"]):
            b = perm[i:i + s["batch_size"]]
            opt.zero_grad(set_to_none=True)
            segmentation_loss(model(images[b]), masks[b]).backward()
            opt.step()
    return model


def evaluate_downstream(run, images: torch.Tensor, masks: torch.Tensor, settings: dict | None = None) -> dict:
    """Per centre (lists in centre order), Dice and HD95 of the first structure of a segmenter trained on (images,
    masks), on the centre's real test images (`centre_dice`, `centre_hd95`; HD95 None where undefined on every
    image); test_accuracy (= mean_dice) is their mean Dice over centres, test_loss the mean soft-Dice loss."""
    seg = train_segmenter(images, masks, run.seed, settings)
    structure = run.ctx.data.extra["structures"][0]
    dice, hd, losses = [], [], []
    for d in range(len(run.ctx.data.domains)):
        on = run.test_domain == d
        m = evaluate_segmentation(seg, run.x_test[on], run.y_test[on], (structure,))
        dice.append(m["dice"][structure])
        hd.append(m["hd95"][structure])
        losses.append(m["loss"])
    mean_dice = float(np.mean(dice))
    return {"test_accuracy": mean_dice, "test_loss": float(np.mean(losses)), "mean_dice": mean_dice,
            "centre_dice": dice, "centre_hd95": hd}
