"""ANTs registration for ``e3pose compare``, run by the Python of a separate environment that has antspyx.

antspyx pins numpy and scipy versions the E3Pose environment cannot take, so this file imports nothing from
E3PoseLogic but its sibling ``worker_protocol.py`` (the line protocol), and nothing beyond numpy and ants.
``comparison.WorkerMethod`` starts it as ``ANTS_PYTHON ants_worker.py TEMPLATE.nii.gz MASK.nii.gz`` (the metric's
region: a ball about the template's head, as for the SimpleITK registration) and exchanges one JSON line per volume
on stdin / stdout::

    {"volume": "/tmp/x.nii.gz", "start": "com" | "search"}
    -> {"matrix": [[...] x 3], "offset": [...]}    (or {"error": "..."})

``matrix``, ``offset``: the registration's transform as ITK applies it, fixed (volume) LPS point p -> moving
(template) LPS point M p + offset; the caller turns it into a pose. ``start``: "com" is ANTs' own default
start (centres of mass aligned, identity rotation); "search" first runs ``ants.affine_initializer``, a grid of
starting rotations each briefly optimised, best metric kept.
"""
from __future__ import annotations

import sys

SEARCH_DEG = 45  # affine_initializer's rotation step about each Euler axis over the whole circle: 8^3 starts
SEARCH_ITERATIONS = 5  # its local optimisation per start
SEARCH_SPACING_MM = 4.0  # the search runs on both images resampled to this (full resolution: minutes per start grid)


def register(ants, template, mask, path, start):
    import numpy as np

    fixed = ants.image_read(path)
    init = None
    if start == "search":
        sp = (SEARCH_SPACING_MM,) * 3
        init = ants.affine_initializer(ants.resample_image(fixed, sp), ants.resample_image(template, sp),
                                       search_factor=SEARCH_DEG, radian_fraction=1.0, use_principal_axis=False,
                                       local_search_iterations=SEARCH_ITERATIONS)
    reg = ants.registration(fixed, template, type_of_transform="Similarity", moving_mask=mask,
                            initial_transform=init)
    tx = ants.read_transform(reg["fwdtransforms"][0])
    p0 = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), dtype=float)
    cols = [np.asarray(tx.apply_to_point(tuple(e)), dtype=float) - p0 for e in np.eye(3)]
    return np.stack(cols, axis=1), p0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import ants
    from worker_protocol import serve  # a sibling file: this Python cannot import the package

    template, mask = ants.image_read(argv[0]), ants.image_read(argv[1])
    return serve(lambda volume, start: register(ants, template, mask, volume, start))


if __name__ == "__main__":
    sys.exit(main())
