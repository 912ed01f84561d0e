"""Training data: published folder layout -> preprocessed arrays cached in memory -> augmented draws.

Layout: IMG_DIR/<id>.nii[.gz] and LAB_DIR/<id>.nii[.gz] with the same names (labels 0 background, 1 brain,
2 eyes); for the E3-CNN a CSV ``frame_id, rot_x, rot_y, rot_z[, fold]`` (scipy extrinsic 'xyz' degrees, voxel-axis
frame -> canonical). Any input grid works: each volume is preprocessed once, as at inference, and kept in RAM.

A draw is a pure function of (seed, epoch, global draw index), so the augmented stream does not depend on the
number of loader workers or processes; processes of a distributed run take interleaved draw indices.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .. import augment
from ..crop import CropBox, crop_array, crop_for_e3cnn, crop_input, cube_box
from ..preprocess import resample_to_grid, unet_input
from ..volume_io import NIFTI_SUFFIXES, load_volume, volume_name


# ------------------------------------------------------------------------------------------------- listing
def list_cases(img_dir, lab_dir, max_cases: Optional[int] = None) -> List[Tuple[str, Path, Path]]:
    """(frame_id, image, label) for every image that has a label of the same name; sorted by frame_id."""
    img_dir, lab_dir = Path(img_dir), Path(lab_dir)
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: not a folder")
    labels = {volume_name(p): p for p in lab_dir.iterdir() if p.name.lower().endswith(NIFTI_SUFFIXES)}
    cases, missing = [], []
    for p in sorted(img_dir.iterdir()):
        if not p.name.lower().endswith(NIFTI_SUFFIXES):
            continue
        fid = volume_name(p)
        if fid in labels:
            cases.append((fid, p, labels[fid]))
        else:
            missing.append(fid)
    if missing:
        print(f"warning: {len(missing)} images in {img_dir} have no label in {lab_dir} (e.g. {missing[0]}); "
              "skipped", file=sys.stderr)
    if not cases:
        raise FileNotFoundError(f"no image/label pairs with the same name in {img_dir} and {lab_dir}")
    return cases[:max_cases] if max_cases else cases


def read_annotations(path) -> Dict[str, np.ndarray]:
    """frame_id -> R_vc (3x3, rows = canonical axes e_x, e_y, e_z in the voxel-axis frame); the CSV is read by the
    same code as ``e3pose evaluate`` reads ground truth, so training and evaluation agree on its convention."""
    from ..evaluate import read_ground_truth

    return {fid: row["rotation_voxel"].T for fid, row in read_ground_truth(path).items()}


def detect_synthetic(*folders) -> Optional[str]:
    """A description if the data came from ``e3pose synth`` (its ``synth_config.json``/``synth.json`` marker sits
    in the data folder or its parent), else None."""
    seen = []
    for folder in folders:
        for d in (Path(folder), Path(folder).parent):
            for name in ("synth_config.json", "synth.json"):
                f = d / name
                if f.is_file() and f not in seen:
                    seen.append(f)
    if not seen:
        return None
    seeds = []
    for f in seen:
        try:
            meta = json.loads(f.read_text())
            if "seed" in meta:
                seeds.append(str(meta["seed"]))
        except (OSError, ValueError):
            pass
    return "synthetic fetal heads (e3pose synth" + (f", seeds {', '.join(seeds)}" if seeds else "") + ")"


# ------------------------------------------------------------------------------------------------- preprocessing
def _load_pair(img_path, lab_path):
    img, affine = load_volume(img_path)
    lab, lab_affine = load_volume(lab_path)
    if lab.shape != img.shape or not np.allclose(lab_affine, affine, atol=1e-3):
        # labels on another grid are still usable: nearest onto the image grid
        lab = resample_to_grid(np.rint(lab).astype(np.uint8), lab_affine, affine, img.shape, order=0)
    return img, affine, np.rint(lab).astype(np.uint8)


def unet_case(img_path, lab_path, spacing: float, size: int):
    """(x float32 size^3 in [0, 1], labels uint8 size^3) on the U-Net grid, exactly as inference builds x."""
    img, affine, lab = _load_pair(img_path, lab_path)
    x, grid = unet_input(img, affine, spacing, size)
    y = resample_to_grid(lab, affine, grid, x.shape, order=0).astype(np.uint8)
    return x, y


@dataclass
class CropCase:
    frame_id: str
    x: np.ndarray  # E3-CNN input, float32 in [0, 1]
    mask: np.ndarray  # brain mask on the crop (uint8), places the spin-history band
    spacing_mm: float  # physical voxel size of the crop (for the band width in mm)
    r_vc: np.ndarray  # 3x3 target: rows = canonical axes in the array-axis frame


def _unet_brain(img_path, lab_path, spacing: float, size: int):
    """(U-Net grid input, true brain mask uint8 on that grid); a case whose brain is outside the grid is an error."""
    x_unet, y = unet_case(img_path, lab_path, spacing, size)
    brain = (y == 1).astype(np.uint8)
    if not brain.any():
        raise ValueError("no brain (label 1) inside the U-Net field of view")
    return x_unet, brain


def e3cnn_case(img_path, lab_path, r_vc, spacing: float, size: int, crop_scale: float, crop_size: int,
               crop_shape: str = "box"):
    """The E3-CNN input built from the ground-truth brain mask with the inference crop (``crop_for_e3cnn``).

    The U-Net grid keeps the input's voxel axes (direction cosines), so R_vc written in the voxel-axis frame is
    also the target in the crop's array-axis frame.
    """
    x_unet, brain = _unet_brain(img_path, lab_path, spacing, size)
    x, box = crop_for_e3cnn(x_unet, brain, crop_scale, crop_size, crop_shape)
    m = crop_array(brain, box, order=0).astype(np.uint8)
    return CropCase(volume_name(img_path), x.astype(np.float32), m, spacing * box.step, np.asarray(r_vc, np.float64))


@dataclass
class CropJitter:
    """How a training draw places the cube crop away from the true mask's (``--centre-jitter``, ``--scale-jitter``,
    ``--unet-crops``).

    Why: inference centres the crop on the U-Net mask's centre of mass and sizes it from that mask's extent. On the
    tuning set (168 volumes) those are 2.6 mm median (p90 5.9 mm) and 0.80-1.15x (p5-p95) away from the true
    mask's, and an E3-CNN trained only on exact crops went from 4.2 % above 60 deg (true-mask crop) to 13 % with
    the crop moved 4 mm. A draw moves the centre by N(0, ``centre_sd_mm``) per axis and scales the side by
    exp(N(0, ``scale_sd``)), both cut at 3 standard deviations. Random moves are not how a U-Net errs (its errors
    follow the anatomy: the centre and the side are wrong together), so a draw can instead take, with probability
    ``unet_fraction``, the crop the U-Net at ``unet_path`` places on that volume, exactly as inference would."""
    centre_sd_mm: float = 0.0
    scale_sd: float = 0.0
    unet_fraction: float = 0.0
    unet_path: Optional[str] = None

    @property
    def moves(self) -> bool:
        return self.centre_sd_mm > 0 or self.scale_sd > 0

    @property
    def uses_unet(self) -> bool:
        return self.unet_fraction > 0 and self.unet_path is not None

    @property
    def active(self) -> bool:
        return self.moves or self.uses_unet

    def reach(self, side: float, spacing: float) -> int:
        """Half-width (U-Net voxels) of the grid a crop of ``side`` can reach under the largest draw."""
        return int(np.ceil(side / 2.0 * np.exp(3.0 * self.scale_sd) + 3.0 * self.centre_sd_mm / spacing)) + 2

    def draw(self, rng, spacing: float):
        """-> (centre shift in U-Net voxels, side factor)."""
        d = np.clip(rng.normal(size=3), -3.0, 3.0) * (self.centre_sd_mm / spacing)
        z = float(np.exp(np.clip(rng.normal(), -3.0, 3.0) * self.scale_sd))
        return d, z

    def to_dict(self):
        d = {"centre_sd_mm": float(self.centre_sd_mm), "scale_sd": float(self.scale_sd)}
        if self.unet_path is not None:
            d.update(unet_fraction=float(self.unet_fraction), unet=str(self.unet_path))
        return d


_UNETS: Dict[str, tuple] = {}  # per process: the --unet-crops network, loaded once


def unet_crop_box(x_unet, unet_path: str, crop_scale: float, crop_size: int) -> Optional[CropBox]:
    """The cube crop inference would place from this U-Net's brain mask on ``x_unet`` (None: no usable mask)."""
    from ..checkpoints import load_unet
    from ..segmentation import unet_masks

    if unet_path not in _UNETS:
        _UNETS[unet_path] = load_unet(unet_path)
    brain = unet_masks(_UNETS[unet_path][0], x_unet)[0]
    if brain.sum() < 8:
        return None
    return cube_box(x_unet, brain, crop_scale, crop_size)


@dataclass
class GridCase:
    """A training case kept as the U-Net grid around its brain (not as one fixed crop), so that every draw samples
    its cube exactly as inference does from a mask that is a little off (``jittered_crop``)."""
    frame_id: str
    region: np.ndarray  # U-Net grid input about the brain, float32; zeros beyond the grid, as inference samples it
    mask: np.ndarray  # brain mask on the region (uint8)
    box: CropBox  # the true mask's cube crop, centre in region voxels
    spacing_mm: float  # U-Net grid spacing
    r_vc: np.ndarray
    unet_box: Optional[CropBox] = None  # --unet-crops: the U-Net mask's cube crop, centre in region voxels


def e3cnn_grid_case(img_path, lab_path, r_vc, spacing: float, size: int, crop_scale: float, crop_size: int,
                    jitter: CropJitter):
    """The true-mask cube crop's neighbourhood on the U-Net grid, wide enough for every ``jitter`` draw."""
    x_unet, brain = _unet_brain(img_path, lab_path, spacing, size)
    box = cube_box(x_unet, brain, crop_scale, crop_size)
    half = jitter.reach(box.side, spacing)
    ubox = unet_crop_box(x_unet, jitter.unet_path, crop_scale, crop_size) if jitter.uses_unet else None
    if ubox is not None:
        half = max(half, int(np.ceil(np.abs(ubox.centre - box.centre).max() + ubox.side / 2.0)) + 2)
    origin = np.floor(box.centre).astype(np.int64) - half
    pad = [(half + 1, half + 1)] * 3
    sl = tuple(slice(int(o) + half + 1, int(o) + 3 * half + 2) for o in origin)
    region = np.pad(x_unet.astype(np.float32), pad)[sl]
    mask = np.pad(brain, pad)[sl]
    return GridCase(volume_name(img_path), region, mask, replace(box, centre=box.centre - origin), float(spacing),
                    np.asarray(r_vc, np.float64),
                    unet_box=None if ubox is None else replace(ubox, centre=ubox.centre - origin))


def jittered_crop(case: GridCase, rng=None, jitter: Optional[CropJitter] = None) -> CropCase:
    """The E3-CNN input of one draw: the U-Net's crop (with probability ``jitter.unet_fraction``, where the U-Net
    found the brain), else the true mask's cube moved and scaled by ``jitter`` (none: the true mask's crop)."""
    box = case.box
    if rng is not None and jitter is not None:
        if jitter.uses_unet and case.unet_box is not None and rng.random() < jitter.unet_fraction:
            box = case.unet_box
        elif jitter.moves:
            d, z = jitter.draw(rng, case.spacing_mm)
            box = replace(box, centre=box.centre + d, side=box.side * z)
    x = crop_input(case.region, box)
    m = crop_array(case.mask, box, order=0).astype(np.uint8)
    return CropCase(case.frame_id, x, m, case.spacing_mm * box.step, case.r_vc)


def _run_jobs(fn, jobs, workers: int, desc: str, progress: bool = True, spawn: bool = False):
    """Apply fn(*job) to every job (processes when workers > 1), with a progress bar; failures are skipped.

    ``spawn``: fresh worker processes for jobs that run torch (a forked child of a process whose torch thread
    pool has run hangs in its first parallel operation)."""
    from tqdm import tqdm

    quiet = not progress
    results = []
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        ctx = multiprocessing.get_context("spawn") if spawn else None
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futures = [ex.submit(fn, *j) for j in jobs]
            for j, f in tqdm(list(zip(jobs, futures)), desc=desc, unit="case", file=sys.stderr, disable=quiet):
                results.append(_get(f.result, j))
    else:
        for j in tqdm(jobs, desc=desc, unit="case", file=sys.stderr, disable=quiet):
            results.append(_get(lambda: fn(*j), j))
    return [r for r in results if r is not None]


def _get(call, job):
    try:
        return call()
    except Exception as exc:  # one unreadable case should not stop a long preprocessing
        print(f"warning: skipped {job[0]}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def cache_unet(cases, spacing, size, workers=1, desc="preprocess", progress=True):
    """In-memory list of (x, labels) for the U-Net."""
    return _run_jobs(unet_case, [(p, q, spacing, size) for _, p, q in cases], workers, desc, progress)


def cache_e3cnn(cases, annotations, spacing, size, crop_scale, crop_size, crop_shape="box", workers=1,
                desc="preprocess", progress=True, jitter: Optional[CropJitter] = None):
    """In-memory list of CropCase (GridCase with an active ``jitter``, cube crops only); cases without an
    annotation row are skipped with a warning."""
    jobs, missing = [], []
    grid = jitter is not None and jitter.active
    if grid and crop_shape != "cube":
        raise ValueError("crop jitter (--centre-jitter, --scale-jitter, --unet-crops) needs --crop-shape cube")
    for fid, p, q in cases:
        if fid in annotations:
            jobs.append((p, q, annotations[fid], spacing, size, crop_scale, crop_size, jitter if grid else crop_shape))
        else:
            missing.append(fid)
    if missing:
        print(f"warning: {len(missing)} cases have no row in the annotation CSV (e.g. {missing[0]}); skipped",
              file=sys.stderr)
    return _run_jobs(e3cnn_grid_case if grid else e3cnn_case, jobs, workers, desc, progress,
                     spawn=grid and jitter.uses_unet)


# ------------------------------------------------------------------------------------------------- augmentation
def augmentation_record(args, chain: dict):
    """What a run's provenance says about its augmentation (--no-augment, --no-intensity-augment or the chain)."""
    if args.no_augment:
        return "none"
    if getattr(args, "no_intensity_augment", False):
        return "rotations only (--no-intensity-augment)"
    return dict(chain)


def rotation_limit(deg: float):
    """--rotation-deg -> augment.random_rotation's argument: >= 180 means uniform over SO(3), 0 none."""
    return None if deg >= 180 else float(deg)


def draw_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), int(index)])


# The U-Net chain with upstream's optional resolution loss switched on (useful for thick-slice / navigator data).
UNET_AUG = {"preset": "unet", "lowres_p": 0.75}
E3CNN_AUG = {"preset": "e3cnn"}


def augment_unet(x, y, rng, rotation_deg: float, spacing: float, intensity: bool = True):
    """Rotation of the U-Net input and its labels about the grid centre, then the intensity chain."""
    if rotation_deg > 0:
        x, y, _ = augment.random_rotation(x, y, rng, rotation_limit(rotation_deg), spacing=spacing)
    if intensity:
        x = augment.augment_intensity(x, rng, UNET_AUG, mask=(y == 1), spacing=spacing)
    return x, y


def pose_in_range(case: CropCase, rng, pose_range_deg: float) -> CropCase:
    """The crop turned about its centre so that its target pose is a draw Q near the reference orientation.

    Q (the new R_target: canonical axes in the array frame) has Euler angles U(+-DEG) about the array axes relative
    to the identity (``augment.random_rotation_matrix``: Q = Rx Ry Rz; >= 180: uniform over SO(3)). The content is
    turned by A = Q^T R_vc, so that R_target = R_vc A^T = Q: whatever the case's own pose, the network only sees
    heads within DEG of one orientation. The mask turns with it (nearest).
    """
    q = augment.random_rotation_matrix(rng, rotation_limit(pose_range_deg))
    A = q.T @ np.asarray(case.r_vc, np.float64)
    x = augment.rotate_about_centre(case.x, A, order=1)
    m = augment.rotate_about_centre(case.mask, A, order=0)
    return CropCase(case.frame_id, x, m, case.spacing_mm, q)


def augment_crop(case: CropCase, rng, rotation_deg: float, intensity: bool = True,
                 pose_range: Optional[float] = None):
    """Rotation A of the crop about its centre (array-axis frame), then the intensity chain.

    Returns (x, R_target) with R_target = R_vc A^T: the canonical axes moved with the content. ``pose_range``
    (degrees, None = off) replaces the rotation relative to the case's own pose (``rotation_deg``) by a pose drawn
    near the reference orientation (``pose_in_range``).
    """
    x, m, target = case.x, case.mask, case.r_vc
    if pose_range is not None:
        turned = pose_in_range(case, rng, pose_range)
        x, m, target = turned.x, turned.mask, turned.r_vc
    elif rotation_deg > 0:
        x, m, A = augment.random_rotation(x, m, rng, rotation_limit(rotation_deg), spacing=1.0)
        target = case.r_vc @ A.T
    if intensity:
        x = augment.augment_intensity(x, rng, E3CNN_AUG, mask=m, spacing=case.spacing_mm)
    return x, target


class DrawDataset:
    """Map-style dataset of augmented draws: item i is draw ``rank + i * world`` of this epoch.

    ``make(cache_item, rng)`` returns the training sample; the case is drawn uniformly with replacement (as
    upstream's IterableDataset), from the same generator, so everything is reproducible from the seed.
    """

    def __init__(self, cache, n_items, make, seed=0, rank=0, world=1):
        self.cache, self.n_items, self.make = cache, int(n_items), make
        self.seed, self.rank, self.world, self.epoch = int(seed), int(rank), int(world), 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return self.n_items

    def __getitem__(self, i):
        rng = draw_rng(self.seed, self.epoch, self.rank + i * self.world)
        k = int(rng.integers(len(self.cache)))
        return self.make(self.cache[k], rng)
