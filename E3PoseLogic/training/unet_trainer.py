"""``e3pose train-unet``: the segmentation U-Net (background, brain, eyes) on the inference grid.

Inputs are built by ``preprocess.unet_input`` with the U-Net's own spacing and size (stored in its config, which
inference reads back), labels mapped nearest onto that grid: train and test preprocessing are the same code.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from ..networks.config import UNetConfig
from ..networks.unet import UNet
from . import data
from .common import base_provenance
from .losses import hard_dice, unet_loss


def recalibrate_batchnorm(model, batches):
    """BatchNorm running statistics as cumulative averages over ``batches`` (input tensors on the model's device),
    run in train mode without gradients; the layers' momenta and the model's mode are restored (why: see
    ``UNetTask.recalibrate_batchnorm``)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)


class UNetTask:
    kind = "unet"
    metric_keys = ("val_dice_brain", "val_dice_eyes")
    title = "U-Net training"
    select_metrics = {"loss": ("val_loss", 1.0), "dice": ("val_dice_brain", -1.0)}  # --select

    def __init__(self, args, train_cache, val_cache, trained_on):
        self.args = args
        self.cfg = UNetConfig(n_levels=args.levels, n_feat=args.n_feat, input_size=args.unet_size,
                              spacing_mm=args.unet_spacing)
        self.model = UNet(self.cfg)
        self.train_cache, self.val_cache, self.trained_on = train_cache, val_cache, trained_on

    def train_dataset(self, n_items, rank, world):
        aug = not self.args.no_augment
        rot, spacing = (self.args.rotation_deg if aug else 0.0), self.cfg.spacing_mm
        intensity = aug and not getattr(self.args, "no_intensity_augment", False)

        def make(item, rng):
            return data.augment_unet(item[0], item[1], rng, rot, spacing, intensity=intensity)

        return data.DrawDataset(self.train_cache, n_items, make, self.args.seed, rank, world)

    @staticmethod
    def collate(batch):
        x = torch.from_numpy(np.stack([b[0] for b in batch]).astype(np.float32))[:, None]
        y = torch.from_numpy(np.stack([b[1] for b in batch]).astype(np.int64))
        return x, y

    def train_loss(self, net, batch, device):
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return unet_loss(net(x), y)

    def recalibrate_batchnorm(self, model, device, n_cases=None, batch_size=None):
        """Re-estimate the BatchNorm running statistics on un-augmented training inputs.

        Training sees augmented inputs (noise, bias, gamma, resolution loss), whose feature statistics differ from
        clean volumes; with those running statistics the eval-mode network (what inference runs) missed the brain
        entirely while train mode found it. Cumulative averages over clean inputs fix that; they do not affect
        training, which uses batch statistics.
        """
        n = min(len(self.train_cache), n_cases or self.args.bn_recalibrate)
        if n <= 0:
            return
        bs = batch_size or self.args.batch_size
        idx = np.linspace(0, len(self.train_cache) - 1, n).round().astype(int)
        recalibrate_batchnorm(model, (self.collate([self.train_cache[k] for k in idx[i:i + bs]])[0].to(device)
                                      for i in range(0, n, bs)))

    def validate(self, model, device, batch_size=None):
        """Mean loss over the validation cases (no augmentation) and hard Dice of the argmax labels, in eval mode
        after re-estimating the BatchNorm statistics on clean training inputs (see ``recalibrate_batchnorm``)."""
        self.recalibrate_batchnorm(model, device)
        model.eval()
        bs = batch_size or self.args.batch_size
        losses, d_brain, d_eyes = [], [], []
        for i in range(0, len(self.val_cache), bs):
            x, y = self.collate(self.val_cache[i:i + bs])
            logits = model(x.to(device))
            losses.append(float(unet_loss(logits, y.to(device))) * len(y))
            pred = logits.argmax(1).cpu().numpy()
            for p, t in zip(pred, y.numpy()):
                d_brain.append(hard_dice(p, t, 1))
                d_eyes.append(hard_dice(p, t, 2))
        n = max(1, len(self.val_cache))
        return {"val_loss": sum(losses) / n, "val_dice_brain": float(np.mean(d_brain)),
                "val_dice_eyes": float(np.mean(d_eyes))}

    def provenance(self, args, epochs_done, elapsed_s, device, best_epoch, best_row):
        return base_provenance(args, self.kind, self.trained_on, len(self.train_cache), len(self.val_cache),
                               epochs_done, elapsed_s, device, best_epoch, best_row,
                               extra={"loss": "class-weighted cross-entropy (1, 8, 2) + 0.5 soft Dice",
                                      "augmentation": data.augmentation_record(args, data.UNET_AUG)})


def run(args) -> int:
    from .common import start_run, train_and_report

    dist, trained_on, train_cases, val_cases = start_run(args)
    if dist.main:
        print(f"U-Net: {len(train_cases)} training, {len(val_cases)} validation cases; grid {args.unet_size}^3 at "
              f"{args.unet_spacing} mm; trained_on: {trained_on}", file=sys.stderr)
    train_cache = data.cache_unet(train_cases, args.unet_spacing, args.unet_size, args.prep_workers, "train data",
                                  progress=dist.main)  # one progress bar in a torchrun job: rank 0's
    val_cache = data.cache_unet(val_cases, args.unet_spacing, args.unet_size, args.prep_workers, "val data") \
        if dist.main else []
    task = UNetTask(args, train_cache, val_cache, trained_on)
    return train_and_report(task, args, dist, len(train_cache), len(val_cache),
                            lambda best: f"Dice brain {best['val_dice_brain']:.3f}")
