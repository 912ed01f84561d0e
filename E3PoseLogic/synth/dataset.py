"""Synthetic training sets in the layout the trainers read: images/, labels/, poses.csv.

Each case draws from its own generator seeded by (seed, index), so cases are independent of how many workers
generate them and of their order, and the same seed gives bitwise-identical files (gzip without time stamps).
"""
from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .. import frames
from .acquisition import AcquisitionConfig, acquire, sample_grid, sample_pose
from .phantom import PhantomParams, Variation, render, sample_environment, sample_phantom, vary_phantom

# "protocol" (standard / navigator) was appended last, so readers that index the older columns keep working.
CSV_COLUMNS = ("frame_id", "rot_x", "rot_y", "rot_z", "com_r", "com_a", "com_s", "ga_weeks", "fold", "protocol")


@dataclass
class SynthConfig:
    ga_range: Tuple[float, float] = (20.0, 38.0)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    val_fraction: float = 0.2
    environment: bool = True
    variation: Variation = field(default_factory=Variation)


@dataclass
class SynthCase:
    frame_id: str
    image: np.ndarray  # int16 (i, j, k)
    label: np.ndarray  # uint8 (i, j, k): 0 background, 1 brain, 2 eyes
    affine: np.ndarray  # 4x4 ijk -> RAS
    pose: np.ndarray  # 4x4 phantom -> world (rotation block = canonical axes in RAS)
    rotation_ras: np.ndarray  # columns e_x, e_y, e_z in world RAS
    rotation_voxel: np.ndarray  # the same axes in the voxel-axis frame (proper); CSV rotation = its transpose
    com_ras: np.ndarray  # brain centre of mass (label 1), world mm
    params: PhantomParams


def case_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def frame_id(seed: int, index: int) -> str:
    return f"syn{int(seed)}_{int(index):05d}"


def rotation_voxel_from_world(rotation_ras, affine) -> np.ndarray:
    """Canonical axes in the voxel-axis frame, right-handed there: D^T R diag(det D, 1, 1) (e_x flips if mirrored)."""
    D = frames.direction_cosines(affine)
    return np.linalg.inv(D) @ np.asarray(rotation_ras, float) @ np.diag([np.sign(np.linalg.det(D)), 1.0, 1.0])


def euler_from_rotation_voxel(rotation_voxel) -> np.ndarray:
    """CSV angles: scipy extrinsic 'xyz' degrees of R_vc = rotation_voxel.T (voxel-axis frame -> canonical)."""
    from scipy.spatial.transform import Rotation

    return Rotation.from_matrix(np.asarray(rotation_voxel).T).as_euler("xyz", degrees=True)


def make_case(seed: int, index: int, cfg: Optional[SynthConfig] = None, ga_weeks: Optional[float] = None) -> SynthCase:
    """Simulate one volume: phantom, acquisition grid, pose, environment, rendering and artefacts."""
    from scipy import ndimage

    cfg = cfg or SynthConfig()
    rng = case_rng(seed, index)
    P = sample_phantom(rng, ga_weeks=ga_weeks, ga_range=cfg.ga_range)
    if cfg.variation.active:  # its own generator: the draws below stay those of the plain phantom's stream
        P = vary_phantom(P, np.random.default_rng([int(seed), int(index), 1]), cfg.variation)
    A, shape = sample_grid(rng, cfg.acquisition, P.head_radius_mm)
    pose = sample_pose(rng, A, shape, P.head_radius_mm)
    env = sample_environment(rng, pose[:3, 3], P.head_radius_mm) if cfg.environment else None
    clean, label = render(P, A, shape, pose, env)
    spacing = np.sqrt((A[:3, :3] ** 2).sum(0))
    thick = int(np.argmax(spacing)) if spacing.max() > 1.5 * spacing.min() else None
    noisy = acquire(clean, label, rng, spacing, cfg.acquisition, slice_axis=thick)
    scale = rng.uniform(800.0, 3000.0) / max(float(np.percentile(noisy, 99.9)), 1e-6)
    image = np.clip(np.round(noisy * scale), 0, 32767).astype(np.int16)
    com_idx = np.asarray(ndimage.center_of_mass(label == 1))
    com = A[:3, :3] @ com_idx + A[:3, 3]
    R = pose[:3, :3]
    return SynthCase(frame_id=frame_id(seed, index), image=image, label=label, affine=A, pose=pose,
                     rotation_ras=R, rotation_voxel=rotation_voxel_from_world(R, A), com_ras=com, params=P)


def nifti_bytes(array: np.ndarray, affine, compresslevel: int = 6) -> bytes:
    """A .nii.gz as bytes: gzip with mtime 0 and no file name, so identical data give identical files.

    Training sets use level 1: noisy images barely compress better at 6, and it halves the writing time.
    """
    import nibabel as nib

    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=compresslevel, mtime=0, filename="") as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        from ..atomic import write_bytes
    except ImportError:  # pragma: no cover - atomic.py is part of the package
        import os

        tmp = path.with_name(f".tmp.{path.name}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return
    write_bytes(path, data)


def pose_row(case: SynthCase, fold: str, protocol: str = "standard") -> dict:
    rx, ry, rz = euler_from_rotation_voxel(case.rotation_voxel)
    return dict(frame_id=case.frame_id, rot_x=rx, rot_y=ry, rot_z=rz, com_r=case.com_ras[0], com_a=case.com_ras[1],
                com_s=case.com_ras[2], ga_weeks=case.params.ga_weeks, fold=fold, protocol=protocol)


def format_row(row: dict) -> str:
    vals = [row["frame_id"]] + [f"{float(row[k]):.6f}" for k in CSV_COLUMNS[1:7]] + \
           [f"{float(row['ga_weeks']):.3f}", row["fold"], row["protocol"]]
    return ",".join(vals)


def _generate_one(args) -> dict:
    outdir, seed, index, n, cfg = args
    case = make_case(seed, index, cfg)
    n_val = int(round(n * cfg.val_fraction))
    if cfg.val_fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    fold = "validation" if index >= n - n_val else "training"
    _write_bytes(Path(outdir) / "images" / f"{case.frame_id}.nii.gz", nifti_bytes(case.image, case.affine, 1))
    _write_bytes(Path(outdir) / "labels" / f"{case.frame_id}.nii.gz", nifti_bytes(case.label, case.affine, 1))
    return pose_row(case, fold, "navigator" if cfg.acquisition.navigator else "standard")


def generate_dataset(outdir, n: int, seed: int = 0, cfg: Optional[SynthConfig] = None, workers: int = 1,
                     progress: bool = False) -> List[dict]:
    """Write ``n`` cases to OUTDIR/images, OUTDIR/labels, OUTDIR/poses.csv (+ synth_config.json); returns the rows.

    The last round(n * val_fraction) cases (at least one when n >= 2) form the "validation" fold.
    """
    cfg = cfg or SynthConfig()
    out = Path(outdir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), seed, i, n, cfg) for i in range(n)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as ex:
            it = ex.map(_generate_one, jobs, chunksize=1)
            rows = list(_progress(it, n, progress))
    else:
        rows = list(_progress(map(_generate_one, jobs), n, progress))
    text = ",".join(CSV_COLUMNS) + "\n" + "".join(format_row(r) + "\n" for r in rows)
    _write_bytes(out / "poses.csv", text.encode())
    meta = dict(generator="e3pose synth", seed=int(seed), n=int(n), ga_range=list(cfg.ga_range),
                val_fraction=cfg.val_fraction, environment=cfg.environment, acquisition=cfg.acquisition.to_dict(),
                variation=cfg.variation.to_dict(),
                rotation_convention="rot_x, rot_y, rot_z: scipy Rotation.from_euler('xyz', degrees) of R_vc, "
                                    "voxel-axis frame -> canonical (rows e_x, e_y, e_z)",
                com="brain (label 1) centre of mass, world RAS mm", synthetic=True)
    _write_bytes(out / "synth_config.json", (json.dumps(meta, indent=2) + "\n").encode())
    return rows


def _progress(it, total, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return it
    return tqdm(it, total=total, unit="case")


SAMPLE_SEED = 20260
SAMPLE_GA = 30.0


def make_sample(outdir, seed: int = SAMPLE_SEED, ga_weeks: float = SAMPLE_GA) -> dict:
    """The bundled demo volume: one ~30-week head, 1.75 mm isotropic, oblique affine with det > 0, and its pose."""
    from .. import __version__

    acq = AcquisitionConfig(voxel_mm=(1.75,), size_mm=(210.0,), oblique_prob=1.0, mirror_prob=0.0,
                            lowres_prob=0.0, spin_history_prob=0.0)
    cfg = SynthConfig(acquisition=acq)
    case = make_case(seed, 0, cfg, ga_weeks=ga_weeks)
    if np.linalg.det(case.affine[:3, :3]) <= 0:  # cannot happen with mirror_prob 0; the sample promises det > 0
        raise RuntimeError("sample affine is mirrored")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    _write_bytes(out / "sample_head.nii.gz", nifti_bytes(case.image, case.affine))
    _write_bytes(out / "sample_head_label.nii.gz", nifti_bytes(case.label, case.affine))
    c2w = np.eye(4)
    c2w[:3, :3] = case.rotation_ras
    c2w[:3, 3] = case.com_ras
    pose = dict(
        input="sample_head.nii.gz", synthetic=True,
        rotation_ras=case.rotation_ras.tolist(), translation_ras=case.com_ras.tolist(),
        rotation_voxel=case.rotation_voxel.tolist(), canonical_to_world_ras=c2w.tolist(),
        ijk_to_ras=case.affine.tolist(), euler_xyz_deg_voxel_to_canonical=euler_from_rotation_voxel(
            case.rotation_voxel).tolist(),
        ga_weeks=ga_weeks, generator=dict(function="E3PoseLogic.synth.make_sample", seed=seed, ga_weeks=ga_weeks,
                                          acquisition=acq.to_dict(), e3pose_version=__version__),
        note="rotation_ras columns = canonical axes e_x (left-right), e_y (posterior->anterior), "
             "e_z (superior->inferior) in world RAS; translation_ras = brain centre of mass (label 1).",
    )
    _write_bytes(out / "sample_head_pose.json", (json.dumps(pose, indent=2) + "\n").encode())
    return pose


def make_canonical_frame_figure(path, seed: int = 4, ga_weeks: float = 30.0) -> None:
    """``Resources/canonical_frame.png``: the phantom's mid-slices in canonical coordinates with e_x, e_y, e_z.

    Eyes lie off the mid-planes, so their outlines are drawn as dashed projections.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .phantom import render_canonical

    P = sample_phantom(np.random.default_rng(seed), ga_weeks=ga_weeks)
    img, lab, A, _ = render_canonical(P, spacing=0.75)
    sp = A[0, 0]
    coords = [A[a, 3] + sp * np.arange(lab.shape[a]) for a in range(3)]
    colours = {"x": "#e41a1c", "y": "#2ca02c", "z": "#1f77b4"}
    words = {"x": "e_x  left-right\n(pseudovector)", "y": "e_y  posterior → anterior",
             "z": "e_z  superior → inferior"}
    # (title, fixed axis, horizontal axis, vertical axis); z (inferior) always points down, y (anterior) right/up
    # the sagittal slice sits 5 mm off the midline: at x = 0 it would cut along the CSF of the interhemispheric fissure
    views = [("parasagittal (x = +5 mm)", 0, 1, 2), ("coronal (y = 0)", 1, 0, 2), ("axial (z = 0)", 2, 0, 1)]
    slice_at = {0: 5.0, 1: 0.0, 2: 0.0}
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), dpi=110, facecolor="white")
    L = 32.0
    for ax, (title, fix, h, v) in zip(axes, views):
        at = int(np.argmin(np.abs(coords[fix] - slice_at[fix])))
        sl = np.take(img, at, axis=fix)
        eyes = np.any(lab == 2, axis=fix)
        brain = np.take(lab == 1, at, axis=fix)
        if h > v:
            sl, eyes, brain = sl.T, eyes.T, brain.T
        down = v == 2  # inferior down
        ext = [coords[h][0], coords[h][-1], coords[v][-1], coords[v][0]] if down else \
              [coords[h][0], coords[h][-1], coords[v][0], coords[v][-1]]
        ax.imshow(sl.T, cmap="gray", vmin=0, vmax=1, extent=ext, origin="upper" if down else "lower")
        hh, vv = np.meshgrid(coords[h], coords[v], indexing="ij")
        ax.contour(hh, vv, brain.astype(float), [0.5], colors=["#ffd92f"], linewidths=1.0)
        ax.contour(hh, vv, eyes.astype(float), [0.5], colors=["#17becf"], linewidths=1.2, linestyles="--")
        if down:
            ax.set_ylim(coords[v][-1], coords[v][0])
        for name, a in (("x", 0), ("y", 1), ("z", 2)):
            if a not in (h, v):
                # screen right x screen up = out of the page
                right = np.eye(3)[h]
                up = -np.eye(3)[v] if down else np.eye(3)[v]
                out = float(np.cross(right, up)[a])
                ax.plot(0, 0, marker="o", ms=9, mfc="none", mec=colours[name], mew=2)
                if out < 0:
                    ax.plot(0, 0, marker="x", ms=7, color=colours[name], mew=2)
                ax.text(-3, -4 if down else 4, f"e_{name} {'out of' if out > 0 else 'into'} page",
                        color=colours[name], fontsize=8, ha="right", va="bottom" if down else "top",
                        bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.0))
                continue
            d = [0.0, 0.0]
            d[0 if a == h else 1] = L
            ax.annotate("", xy=(d[0], d[1]), xytext=(0, 0),
                        arrowprops=dict(arrowstyle="-|>", color=colours[name], lw=2.5, mutation_scale=16))
            ax.text(d[0] * 1.12 + (2 if a == h else 0), d[1] * 1.12, words[name], color=colours[name],
                    fontsize=9, fontweight="bold", ha="left" if a == h else "center",
                    va="center" if a == h else ("top" if down else "bottom"),
                    bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=1.5))
        ax.set_title(title)
        ax.set_xlabel(f"{'xyz'[h]} (mm)")
        ax.set_ylabel(f"{'xyz'[v]} (mm)")
    fig.suptitle("E(3)-Pose canonical frame (synthetic fetal head, 30 weeks): origin = brain centre of mass; "
                 "x = y × z points to the fetal left.\nYellow: brain label (slice); cyan dashed: eyes (projection) — "
                 "anterior (+y) and inferior (+z).", fontsize=10)
    fig.tight_layout()
    from ..atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
