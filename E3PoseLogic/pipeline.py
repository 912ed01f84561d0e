"""The E(3)-Pose pipeline: volume (array + IJK-to-RAS) -> fetal head pose.

Stages: U-Net input (3 mm, 128^3) -> U-Net -> brain mask (posterior thresholds, largest component) -> centre of mass
(translation) -> crop around the brain -> E3-CNN (pseudovector + 2 vectors) -> rotation (handedness + SVD) -> world
frame. Each stage is a function of this module so tests and benchmarks can call it alone.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
from scipy import ndimage

from . import __version__, frames
from .crop import crop_for_e3cnn
from .errors import E3PoseError
from .preprocess import field_of_view, map_unet_mask_to_input, resample_to_grid, unet_input
from .result import PoseResult
from .refine import check_refine, refine_pose
from .judge import check_second_look, judged_pose, second_look_allowed
from .residual import correct_pose, frame_choice, mark_doubt, needs_retry
from .rotation import axes_to_rotation, geodesic_deg, voxel_rotation, world_rotation
from .segmentation import DEFAULT_THRESHOLDS, check_mask, unet_masks
from .turned_reading import TURNS, turned_readings

# other U-Net grids tried, as multiples of the model's spacing, when the first grid's mask is refused (no brain, or
# a mask at the edge of the field of view): finer first (small brains are the usual miss), then coarser
FALLBACK_SPACING_FACTORS = (5.0 / 6.0, 4.0 / 6.0, 7.0 / 6.0, 8.0 / 6.0)

# U-Net grids tried again, as multiples of the model's spacing, when the pose comes out doubtful (``_retry_grids``)
DOUBT_RETRY_FACTORS = (5.0 / 6.0, 4.5 / 6.0, 4.0 / 6.0)

STAGES = ("preprocess", "segmentation", "crop", "rotation", "refine", "output")


class Cancelled(E3PoseError):
    """The caller asked to stop (Slicer's Cancel button, Ctrl-C in a worker)."""


def resolve_device(device="auto", local_rank=None):
    """``torch.device`` for a user's choice: "auto" (a CUDA GPU if there is one, else the CPU), "cpu", "cuda"
    (alias "gpu"), "cuda:N", or a ``torch.device``. ``local_rank`` (distributed training) picks the GPU index for a
    bare "cuda"/"gpu"/"auto". An impossible choice raises ``E3PoseError`` with a message a user can act on.
    The one device resolver of the package (inference, benchmark and training use it)."""
    import torch

    name = "auto" if device is None else str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "gpu" or name.startswith("gpu:"):
        name = "cuda" + name[3:]
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise E3PoseError(f"device '{device}' was asked for but no CUDA GPU is available (use --device cpu)")
        if name == "cuda" and local_rank is not None:
            name = f"cuda:{int(local_rank)}"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise E3PoseError(f"unknown device '{device}' (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise E3PoseError(f"device '{device}': there is no GPU {dev.index} ({torch.cuda.device_count()} found)")
    if dev.type not in ("cpu", "cuda"):
        raise E3PoseError(f"device '{device}' is not supported (use auto, cpu, cuda or cuda:N)")
    return dev


class Pipeline:
    """Holds the two loaded networks; ``run`` estimates one pose. Reuse one Pipeline for a batch."""

    def __init__(self, unet, e3cnn, unet_info=None, e3cnn_info=None, device="auto",
                 thresholds=DEFAULT_THRESHOLDS, refiner=None, refiner_info=None, residual=None, residual_info=None,
                 retry_factors=DOUBT_RETRY_FACTORS, judge=None, judge_info=None, turned_readings=TURNS):
        import torch

        self.device = resolve_device(device)
        # channels-last 3D convolutions: about 1.5x faster on CPU (oneDNN), same results to float32 round-off
        self.unet = unet.to(self.device, memory_format=torch.channels_last_3d).eval() if unet is not None else None
        self.e3cnn = e3cnn.to(self.device).eval()
        self.unet_info = dict(unet_info or {})
        self.e3cnn_info = dict(e3cnn_info or {})
        self.thresholds = tuple(thresholds)
        self.unet_size = getattr(getattr(unet, "config", None), "input_size", 128)
        self.unet_spacing = getattr(getattr(unet, "config", None), "spacing_mm", 3.0)
        # the refinement network runs on the CPU: it is a few milliseconds, and the plane search is numpy anyway
        self.refiner = refiner.eval() if refiner is not None else None
        self.refiner_info = dict(refiner_info or {})
        # the residual network: the refinement's last step (``residual``), CPU too (two 32^3 readings)
        self.residual = residual.for_inference() if residual is not None else None
        self.residual_info = dict(residual_info or {})
        # the frame judge (``judge``): a wide-view pose logit that checks the refined frame and searches when it
        # looks wrong; used only with a residual network
        self.judge = judge.for_inference() if judge is not None and residual is not None else None
        self.judge_info = dict(judge_info or {}) if self.judge is not None else {}
        # the grids a doubtful pose is made again on (``_retry_grids``); an argument so that a study of other grids
        # (Resources/benchmarks/retry_grids.py) builds its own pipeline instead of changing the module's default
        self.retry_factors = tuple(float(f) for f in retry_factors)
        # turned copies of a cube crop the E3-CNN reads besides the crop itself (``turned_reading``; 0: none)
        self.turned_readings = int(turned_readings)
        # the bundled refinement exists but was not paired with the E3-CNN given (``from_files``)
        self.refinement_withheld = False

    @classmethod
    def from_files(cls, unet_path=None, e3cnn_path=None, device="auto", allow_pickle=False, refiner_path=None,
                   residual_path=None, retry_factors=DOUBT_RETRY_FACTORS, judge_path=None):
        """Load the networks; ``None`` means the bundled default model (see ``models``).

        The refinement network comes from ``refiner_path``, else from the bundled model when its E3-CNN is used;
        published checkpoints have none (then ``run`` skips the refinement and says so). The residual network
        (the refinement's last step) likewise from ``residual_path`` or the bundled model; without one the
        refinement ends with the 2D network's reading.
        """
        from . import models
        from .checkpoints import load_e3cnn, load_judge, load_refiner, load_residual, load_unet

        refiner, refiner_info, residual, residual_info, judge, judge_info = None, None, None, None, None, None
        withheld = False  # the bundled refinement exists but is not paired with the E3-CNN given
        if unet_path is None or e3cnn_path is None:
            default = models.default_model()
            withheld = e3cnn_path is not None and default.refiner is not None and not default.random_weights
            if default.random_weights:
                unet, unet_info, e3cnn, e3cnn_info = models.random_networks()
            else:
                unet, unet_info = load_unet(default.unet)
                e3cnn, e3cnn_info = load_e3cnn(default.e3cnn)
                for info in (unet_info, e3cnn_info):
                    info.update(model=default.label, warning=default.warning)
                if e3cnn_path is None and default.refiner is not None:
                    refiner, refiner_info = load_refiner(default.refiner)
                    refiner_info.update(model=default.label, warning=default.warning)
                if e3cnn_path is None and default.residual is not None:
                    residual, residual_info = load_residual(default.residual)
                    residual_info.update(model=default.label, warning=default.warning)
                if e3cnn_path is None and default.judge is not None:
                    judge, judge_info = load_judge(default.judge)
                    judge_info.update(model=default.label, warning=default.warning)
            if unet_path is not None:
                unet, unet_info = load_unet(unet_path, allow_pickle)
            if e3cnn_path is not None:
                e3cnn, e3cnn_info = load_e3cnn(e3cnn_path, allow_pickle)
        else:
            unet, unet_info = load_unet(unet_path, allow_pickle)
            e3cnn, e3cnn_info = load_e3cnn(e3cnn_path, allow_pickle)
        if refiner_path is not None:
            refiner, refiner_info = load_refiner(refiner_path)
        if residual_path is not None:
            residual, residual_info = load_residual(residual_path)
        if judge_path is not None:
            judge, judge_info = load_judge(judge_path)
        pipe = cls(unet, e3cnn, unet_info, e3cnn_info, device, refiner=refiner, refiner_info=refiner_info,
                   residual=residual, residual_info=residual_info, retry_factors=retry_factors, judge=judge,
                   judge_info=judge_info)
        pipe.refinement_withheld = withheld
        return pipe

    @property
    def no_refiner_why(self) -> str:
        """Why this model has no refinement network, for the output and for --refine on's error."""
        if str(self.e3cnn_info.get("format", "")).startswith("published"):
            return "published checkpoints have none"
        if self.refinement_withheld:
            # the bundled refinement learned the bundled model's canonical frame; an E3-CNN trained on other
            # annotations may define another, so it is not paired with them unasked
            return ("the bundled refinement networks go with the bundled E3-CNN only: to use them with this one, "
                    "give --refiner, --residual and --judge")
        return "none was given (--refiner)"

    @property
    def warnings(self):
        """What users must be told about the networks (random weights, synthetic-only training, ...)."""
        return sorted({w for w in (self.unet_info.get("warning"), self.e3cnn_info.get("warning")) if w})

    @property
    def is_trained(self):
        """False when either network is a random-weight placeholder (then every output says so)."""
        return not (self.unet_info.get("random_weights") or self.e3cnn_info.get("random_weights"))

    def refine_mode(self, refine="auto") -> str:
        """The refinement choice, validated against this model: "on" without a refinement network is an error."""
        refine = check_refine(refine)
        if refine == "on" and self.refiner is None:
            raise E3PoseError("refinement was asked for (--refine on) but this model has no refinement network "
                              f"({self.no_refiner_why}); give one with --refiner, or use --refine auto")
        return refine

    # ------------------------------------------------------------------------------------------------ stages
    def segment(self, x_unet):
        """U-Net grid volume (float32, [0,1]) -> (brain mask, eye mask), uint8 on the same grid."""
        return unet_masks(self.unet, x_unet, self.thresholds, self.device)

    def segment_multiscale(self, array, affine, x, unet_affine, fov, source, factors=None):
        """Brain and eyes on the U-Net grid, retried on other grids when the first grid's mask is refused.

        The U-Net learns a brain-size prior: a 20-week brain at 6 mm is too few voxels and comes out empty, yet
        the same U-Net finds it on a 5 or 4 mm grid (same field of view); a few heads need a coarser grid instead.
        A mask that reaches the edge of the field of view is retried too: on a small head the model's grid can run
        into the surroundings where another grid keeps to the brain. Only refusals are retried, so every mask the
        first grid accepts is unchanged. A mask from another grid is carried back to the U-Net grid, where the crop
        and the centre of mass are computed as usual (and checked again).
        ``factors`` (multiples of the model's spacing, tried in order) replaces the usual order.
        -> (brain, eyes, volume ml, spacing used); the first grid's error when no grid gives an acceptable mask.
        """
        from .errors import MaskAtBorder, NoBrainFound

        first_error = None
        for factor in ((1.0,) + FALLBACK_SPACING_FACTORS) if factors is None else tuple(factors):
            spacing = self.unet_spacing * factor
            if factor == 1.0:
                grid_x, grid, grid_fov = x, unet_affine, fov
            else:
                size = int(np.ceil(self.unet_size / factor / 8.0) * 8)  # about the same field of view, U-Net-friendly
                grid_x, grid = unet_input(array, affine, spacing, size)
                grid_fov = field_of_view(array.shape, affine, grid, grid_x.shape)
            brain, eyes = self.segment(grid_x)
            try:
                volume_ml = check_mask(brain, source, _voxel_ml(grid), fov=grid_fov)
            except (NoBrainFound, MaskAtBorder) as err:
                first_error = first_error or err
                continue
            if factor != 1.0:
                brain = resample_to_grid(brain, grid, unet_affine, x.shape, order=0).astype(np.uint8)
                eyes = resample_to_grid(eyes, grid, unet_affine, x.shape, order=0).astype(np.uint8)
                try:
                    volume_ml = check_mask(brain, source, _voxel_ml(unet_affine), fov=fov)
                except (NoBrainFound, MaskAtBorder) as err:
                    first_error = first_error or err
                    continue
            return brain, eyes, volume_ml, spacing
        raise first_error

    def network_axes(self, x_crop):
        """E3-CNN input -> (p, a, b) as a [3, 3] array (rows), components along the array axes."""
        return self.network_axes_batch(np.asarray(x_crop)[None])[0]

    def network_axes_batch(self, x_crops):
        """E3-CNN inputs [B, S, S, S] -> (p, a, b) rows [B, 3, 3], in one network call."""
        import torch

        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x_crops, dtype=np.float32))[:, None].to(self.device)
            out = self.e3cnn(t).float().cpu().numpy().astype(np.float64)
        return out.reshape(-1, 3, 3)

    def recentred_rotation(self, x, box, unet_affine, centre_ras, affine):
        """The E3-CNN read again on its cube moved to ``centre_ras`` (the refined brain centre) -> world rotation.

        Tuning set: 12 -> 11 deg median, 15 -> 7 % above 60 deg against the first reading (about the U-Net mask's
        centre of mass), as good as about the true centre; used as a second opinion on the final pose."""
        from dataclasses import replace

        from .crop import crop_input

        centre = frames.apply(np.linalg.inv(unet_affine), centre_ras)
        axes = self.network_axes(crop_input(x, replace(box, centre=centre)))
        return world_rotation(axes_to_rotation(*axes)[0], frames.direction_cosines(affine))

    def _pose_from_mask(self, array, affine, x, unet_affine, brain, eyes, volume_ml, unet_spacing, refine,
                        move_centre, clock, step, second_look=True):
        """Crop, E3-CNN and refinement from one brain mask on the U-Net grid -> dict (see ``run``), the mask and the
        grid it came from included."""
        step("crop", 0.5)
        with clock("crop"):
            com_unet = np.array(ndimage.center_of_mass(brain), dtype=np.float64)
            translation = frames.apply(unet_affine, com_unet)
            cfg = self.e3cnn.config
            x_crop, box = crop_for_e3cnn(x, brain, cfg.crop_scale, cfg.crop_size, cfg.crop_shape)
        refining = refine != "off" and self.refiner is not None
        step("rotation", 0.6)
        with clock("rotation"):
            axes = self.network_axes(x_crop)
            rot_voxel, rot_info = axes_to_rotation(*axes)
            # the turned readings where the E3-CNN's pose is the answer (no refinement follows): started from the
            # pooled pose the refinement was no better (session 29, tuning set: 95th percentile 17.3 -> 12.3 deg
            # but above 30 deg 1 -> 2), so with refinement it starts from the first reading, as before
            if box.shape == "cube" and self.turned_readings > 0 and not refining:
                rot_voxel, rot_info["turned"] = turned_readings(self.network_axes_batch, x, box, axes,
                                                                n=self.turned_readings)
            rotation = world_rotation(rot_voxel, frames.direction_cosines(affine))
        network = dict(rotation=rotation, translation=translation, rotation_voxel=rot_voxel)
        if refining:
            step("refine", 0.7)
            with clock("refine"):
                ref = refine_pose(self.refiner, array, affine, translation, rotation, volume_ml,
                                  move_centre=move_centre)
                refinement = dict(applied=True, **ref.info)
                rotation, translation = ref.rotation, ref.translation
                if self.residual is not None:
                    rotation, translation, refinement["residual"] = correct_pose(
                        self.residual, array, affine, translation, rotation, volume_ml, move_centre=move_centre,
                        others=[network["rotation"]], plane_cfg=self.refiner.config)
                    choice = refinement["residual"].get("frame_choice")
                    judged = None
                    if self.judge is not None:
                        rotation, translation, judged = judged_pose(
                            self.judge, self.residual, array, affine, translation, rotation, volume_ml,
                            move_centre=move_centre, plane_cfg=self.refiner.config, search=second_look)
                        refinement["judge"] = judged
                    if choice is not None and (box.shape == "cube" or judged):
                        away = None
                        if box.shape == "cube":
                            reread = self.recentred_rotation(x, box, unet_affine, translation, affine)
                            away = geodesic_deg(reread, rotation)
                        mark_doubt(choice, away, judge_logit=judged["logit"] if judged else None,
                                   judge_switched=bool(judged and judged.get("switched")),
                                   last_step_deg=refinement["residual"]["steps"][-1]["angle_deg"])
                    refinement.update(angle_moved_deg=geodesic_deg(network["rotation"], rotation),
                                      centre_moved_mm=float(np.linalg.norm(translation - network["translation"])))
                else:
                    refinement["residual"] = None
                rot_voxel = voxel_rotation(rotation, frames.direction_cosines(affine))
        else:
            refinement = {"applied": False, "reason": "turned off (refine off)" if refine == "off" else
                          f"this model has no refinement network ({self.no_refiner_why})"}
        return dict(x_crop=x_crop, box=box, axes=axes, rot_info=rot_info, com_unet=com_unet, rotation=rotation,
                    translation=translation, rotation_voxel=rot_voxel, network=network, refinement=refinement,
                    brain=brain, eyes=eyes, volume_ml=volume_ml, unet_spacing=float(unet_spacing))

    def _retry_grids(self, array, affine, x, unet_affine, fov, source, refine, step, first):
        """A doubtful pose: the whole estimate again from the U-Net's masks on the ``retry_factors`` grids;
        the pose with the highest ``retry_logit`` (the residual network's pose logit) is kept (its own doubt flag
        with it).

        Why: most doubtful poses come from a poor U-Net mask of a small or coarse head (the pose is then 2 deg
        median with the true mask); the same U-Net on a finer grid often draws a better one. Tuning set (168
        volumes, 23 doubtful): above 60 deg 6.5 -> 3.6 %, above 30 deg 7.1 -> 4.8 %, no pose the first grid did
        not flag changes. The 4.5 mm grid (session 16; two tuning sets, 336 volumes, 66 retried): above 30 deg
        20 -> 17, above 60 deg 15 -> 12; other grids and other ways to choose the attempt did no better. Ranked
        by the frame judge's logit instead (session 19) the same tuning sets had as many poses above 30 and 60 deg
        but a 95th percentile 3 deg higher, and the transfer set kept poorer masks (centre 95th percentile 18 mm
        against 8): the judge tells a head's frame from a turned one, not a good mask from a poor one.
        ``first``: the first grid's pose (``_pose_from_mask``).
        """
        from .errors import MaskAtBorder, NoBrainFound

        best, tried = first, [_retry_record(first)]
        for factor in self.retry_factors:
            spacing = self.unet_spacing * factor
            if np.isclose(spacing, first["unet_spacing"]):
                continue
            step("refine", 0.8)
            try:
                brain, eyes, volume_ml, spacing = self.segment_multiscale(array, affine, x, unet_affine, fov, source,
                                                                          factors=(factor,))
            except (NoBrainFound, MaskAtBorder) as err:
                tried.append({"unet_spacing_mm": float(spacing), "refused": str(err)})
                continue
            pose = self._pose_from_mask(array, affine, x, unet_affine, brain, eyes, volume_ml, spacing, refine, True,
                                        _Clock({}), lambda *a: None)
            tried.append(_retry_record(pose))
            if retry_logit(pose["refinement"]) > retry_logit(best["refinement"]):
                best = pose
        best["refinement"]["grid_retry"] = {"tried": tried, "chosen_unet_spacing_mm": best["unet_spacing"]}
        return best

    # ------------------------------------------------------------------------------------------------ run
    def run(self, array_ijk, ijk_to_ras, mask=None, source=None,
            progress: Optional[Callable[[str, float], None]] = None,
            cancel: Optional[Callable[[], bool]] = None, refine: str = "auto",
            second_look: str = "auto") -> PoseResult:
        """Estimate the pose of the fetal head in one volume.

        array_ijk: 3D array in (i, j, k) order; ijk_to_ras: its 4x4 grid; mask: optional brain mask on the same
        grid (skips the U-Net). ``source`` names the input in error messages. ``progress(stage, fraction)`` is
        called as stages finish; ``cancel()`` returning True stops at the next stage boundary. ``refine``: "auto"
        (refine when the model has a refinement network), "on" (error if it has none) or "off".

        ``second_look``: where a pose that looks wrong gets a second look (the frame judge's search over all
        rotations and the grid retry of doubtful poses): "auto" (navigator-like volumes only, see
        ``judge.second_look_allowed``), "always" or "off". Doubtful poses are flagged either way.
        """
        refine = self.refine_mode(refine)
        second_look = check_second_look(second_look)
        timings = {}
        clock = _Clock(timings)
        array = np.asarray(array_ijk)
        affine = np.asarray(ijk_to_ras, dtype=np.float64)
        _validate(array, affine, source)

        def step(stage, fraction):
            if cancel is not None and cancel():
                raise Cancelled(f"{source or 'volume'}: cancelled")
            if progress is not None:
                progress(stage, fraction)

        step("preprocess", 0.0)
        with clock("preprocess"):
            x, unet_affine = unet_input(array, affine, self.unet_spacing, self.unet_size)
            fov = field_of_view(array.shape, affine, unet_affine, x.shape)
        step("segmentation", 0.15)
        with clock("segmentation"):
            unet_spacing = self.unet_spacing
            if mask is None:
                brain, eyes, volume_ml, unet_spacing = self.segment_multiscale(array, affine, x, unet_affine, fov,
                                                                               source)
                mask_source = "unet"
            else:
                brain = resample_to_grid(np.asarray(mask, np.uint8), affine, unet_affine, x.shape, order=0)
                eyes = None
                mask_source = "given"
                volume_ml = check_mask(brain, source, _voxel_ml(unet_affine), fov=fov)
        looking = second_look_allowed(second_look, affine)
        pose = self._pose_from_mask(array, affine, x, unet_affine, brain, eyes, volume_ml, unet_spacing, refine,
                                    mask is None, clock, step, second_look=looking)
        if mask is None and looking and needs_retry(frame_choice(pose["refinement"])):
            with clock("doubt_retry"):
                pose = self._retry_grids(array, affine, x, unet_affine, fov, source, refine, step, pose)
        if pose["refinement"].get("applied"):
            pose["refinement"]["second_look"] = {"mode": second_look, "allowed": looking}
        brain, eyes, volume_ml, unet_spacing = (pose[k] for k in ("brain", "eyes", "volume_ml", "unet_spacing"))
        x_crop, box, axes, rot_info, com_unet = (pose[k] for k in ("x_crop", "box", "axes", "rot_info", "com_unet"))
        rotation, translation, rot_voxel = pose["rotation"], pose["translation"], pose["rotation_voxel"]
        network, refinement = pose["network"], pose["refinement"]
        step("output", 0.95)
        with clock("output"):
            brain_in = np.asarray(mask, np.uint8) if mask is not None else \
                map_unet_mask_to_input(brain, unet_affine, affine, array.shape)
            eyes_in = map_unet_mask_to_input(eyes, unet_affine, affine, array.shape) if eyes is not None else None
        timings["total"] = sum(timings.values())
        step("done", 1.0)
        confidence = {
            "brain_volume_ml": volume_ml,
            "unet_spacing_mm": float(unet_spacing),
            "axes_singular_values": rot_info["singular_values"],
            "axes_min_singular_value": float(min(rot_info["singular_values"])),
            "det_pab": rot_info["det_pab"],
            "pseudovector_norm": float(np.linalg.norm(axes[0])),
            # a and b are means of per-voxel unit vectors: a norm near 1 means the voxels agree
            "vector_a_agreement": float(np.linalg.norm(axes[1])),
            "vector_b_agreement": float(np.linalg.norm(axes[2])),
            # the E3-CNN's turned readings (cube crops): how many, how many agreed, how far the pooled frame moved
            "network_turned_readings": rot_info.get("turned"),
            "refinement": refinement,
        }
        return PoseResult(
            rotation=rotation, translation=translation, brain_mask=brain_in, eye_mask=eyes_in,
            ijk_to_ras=affine, rotation_voxel=rot_voxel, crop=x_crop,
            crop_info={**box.to_dict(), "unet_ijk_to_ras": unet_affine.tolist(), "com_unet_voxel": com_unet.tolist()},
            network_axes=axes, confidence=confidence, timings=timings, network_rotation=network["rotation"],
            network_translation=network["translation"], network_rotation_voxel=network["rotation_voxel"],
            provenance={"e3pose_version": __version__, "device": str(self.device), "mask_source": mask_source,
                        "unet": dict(self.unet_info), "e3cnn": dict(self.e3cnn_info),
                        "refiner": dict(self.refiner_info) if self.refiner is not None else None,
                        "residual": dict(self.residual_info) if self.residual is not None else None,
                        "judge": dict(self.judge_info) if self.judge is not None else None,
                        "trained": self.is_trained},
        )


def retry_logit(refinement) -> float:
    """What the grid retry ranks attempts by: the residual network's pose logit of its chosen frame (-inf without
    one). Not the frame judge's logit, although the judge's decides the doubt flag (``_retry_grids``)."""
    return float(frame_choice(refinement).get("pose_logit", -np.inf))


def attempt_record(unet_spacing, refinement, volume_ml, rotation, rotation_voxel, translation) -> dict:
    """One pose attempt as the grid retry lists it (``grid_retry.tried``): enough to score another way of choosing
    among the attempts offline against annotations (``Resources/benchmarks/retry_grids.py``, which also records a
    pose that was not retried this way)."""
    choice = frame_choice(refinement)
    return {"unet_spacing_mm": float(unet_spacing), "pose_logit": float(choice.get("pose_logit", -np.inf)),
            "judge_logit": choice.get("judge_logit"), "doubtful": bool(choice.get("doubtful")),
            "doubt_reasons": list(choice.get("doubt_reasons") or []),
            "brain_volume_ml": float(volume_ml),
            "rotation_ras": np.asarray(rotation, dtype=float).tolist(),
            "rotation_voxel": np.asarray(rotation_voxel, dtype=float).tolist(),
            "translation_ras": np.asarray(translation, dtype=float).tolist()}


def _retry_record(pose) -> dict:
    return attempt_record(pose["unet_spacing"], pose["refinement"], pose["volume_ml"], pose["rotation"],
                          pose["rotation_voxel"], pose["translation"])


def _voxel_ml(ijk_to_ras):
    """Voxel volume of a grid in mm^3 (``check_mask``'s unit)."""
    return float(np.prod(frames.voxel_sizes(ijk_to_ras)))


def _validate(array, affine, source):
    """The checks ``volume_io.load_volume`` makes, for arrays that come from elsewhere (Slicer, scripts)."""
    from .errors import InputError
    from .volume_io import check_values

    if array.ndim != 3:
        raise InputError(source, f"expected a 3D volume, got shape {array.shape}")
    frames.check_grid(affine, source)
    check_values(array, source)


class _Clock:
    def __init__(self, store):
        self.store = store

    @contextmanager
    def __call__(self, name):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.store[name] = time.perf_counter() - t0
