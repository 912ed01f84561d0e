"""FireANTs registration for ``e3pose compare``, run by the Python of a separate environment that has fireants.

fireants 1.5.0 pins SimpleITK 2.2.1, which the E3Pose environment cannot take, so this file imports nothing from
E3PoseLogic but its sibling ``worker_protocol.py`` (the line protocol), and nothing beyond numpy, torch, SimpleITK and
fireants. ``comparison.WorkerMethod`` starts it as ``FIREANTS_PYTHON fireants_worker.py TEMPLATE.nii.gz MASK.nii.gz``
and exchanges one JSON line per volume on stdin / stdout, as ``ants_worker.py`` does::

    {"volume": "/tmp/x.nii.gz", "start": "com" | "moments"}
    -> {"matrix": [[...] x 3], "offset": [...]}    (or {"error": "..."})

``matrix``, ``offset``: fixed (volume) LPS point p -> moving (template) LPS point M p + offset, as ITK applies a
transform. FireANTs' usual pipeline: second-order moments matching (its sign choices settled by the metric) as the
start, then a rigid registration with a scale per axis (the template's head is not the volume's size), local
normalised cross-correlation, coarse to fine. The whole template is used, not only its head: multiplied by the
head mask, its zero surroundings let the scales run away (a template copy turned 20 deg ended 38-93 deg off, the
scale 1.3-2x); FireANTs' masked metrics need the mask as an extra image channel, which this adapter does not do.
"""
from __future__ import annotations

import sys

SCALES = (4, 2)  # FireANTs' down-sampling factors, coarse to fine (full resolution not tried: it multiplies the time)
ITERATIONS = (100, 50)
MOMENTS_SCALE = 2
OPTIMIZER_LR = 1e-2  # Adam on the quaternion, translation and log-scales (a template copy turned 20 deg: 1.3 deg)
DEVICE = "cpu"  # the comparison's machine has no GPU; FireANTs runs on torch's CPU back end


def register(fa, sitk, template, path, start):
    import numpy as np

    from fireants.registration.moments import MomentsRegistration
    from fireants.registration.rigid import RigidRegistration

    fixed = fa.BatchedImages([fa.Image(sitk.ReadImage(path, sitk.sitkFloat32), device=DEVICE)])
    # "com": centres of mass aligned, no rotation (ANTs' default start); "moments": principal axes as well, their
    # sign choices settled by the metric
    mom = MomentsRegistration(MOMENTS_SCALE, fixed, template, moments=2 if start == "moments" else 1,
                              orientation="rot", blur=True, loss_type="cc")
    mom.optimize()
    init = mom.get_rigid_init_dict()
    reg = RigidRegistration(list(SCALES), list(ITERATIONS), fixed, template, loss_type="cc", optimizer="Adam",
                            optimizer_lr=OPTIMIZER_LR, cc_kernel_size=5, scaling=True, **init)
    reg.optimize()
    mat = reg.get_rigid_matrix(homogenous=True)[0].detach().cpu().numpy().astype(np.float64)
    return mat[:3, :3], mat[:3, 3]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import logging
    import os

    # stdout carries the replies only: fireants prints at import, logs every stage and draws progress bars
    reply_to, sys.stdout = sys.stdout, sys.stderr
    os.environ.setdefault("TQDM_DISABLE", "1")
    import SimpleITK as sitk
    from fireants.io import image as fa

    logging.disable(logging.INFO)
    from worker_protocol import serve  # a sibling file: this Python cannot import the package

    template = sitk.ReadImage(argv[0], sitk.sitkFloat32)  # argv[1], the head mask, is not used: see above
    moving = fa.BatchedImages([fa.Image(template, device=DEVICE)])
    return serve(lambda volume, start: register(fa, sitk, moving, volume, start), reply_to)


if __name__ == "__main__":
    sys.exit(main())
