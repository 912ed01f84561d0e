"""MRML adapters: E3Pose results in a Slicer scene, and back out to files.

Every function takes the scene (or a node of it) as an argument and never touches ``slicer.app``,
``slicer.modules`` or ``slicer.mrmlScene``, so the same code runs inside 3D Slicer and, for tests and the QC
renderer, under the ``slicer-core`` wheel (``pip install slicer-core``). ``slicer`` and ``vtk`` are imported inside
the functions: importing this package stays light.

Modules:
- ``scene_app``: a headless "application" (scene + application logic + the module logics MRML needs).
- ``nodes``:     volume <-> (array_ijk, ijk_to_ras), ``write_pose`` (transform, segmentation, axes, handles),
                 the manual-edit flag, "reorient volume".
- ``export``:    transform (.h5/.tfm), JSON, published .npy, mask (.nii.gz/.seg.nrrd), scene (.mrb/.mrml), with
                 atomic writes.
- ``worker``:    the background process the Slicer module starts (``python -m E3PoseLogic.mrml.worker``) and the
                 pure-Python runner that reads its progress lines and cancels it.

Transform direction (the one convention to remember): the pose transform node "<volume> pose" has
ToParent = canonical -> world RAS = ``PoseResult.canonical_to_world``. The canonical axes markups sit under it in
canonical coordinates, so they follow manual edits of the transform.
"""

SLICER_CORE_HINT = (
    "This needs Slicer's MRML libraries: run it inside 3D Slicer, or install the standalone wheel with "
    "`pip install slicer-core`."
)


def require_slicer():
    """Import and return ``slicer`` or raise ImportError with an actionable message."""
    try:
        import slicer  # noqa: F401
        import vtk  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(f"{SLICER_CORE_HINT} ({exc})") from exc
    if not hasattr(slicer, "vtkMRMLScene"):  # pragma: no cover
        raise ImportError(f"{SLICER_CORE_HINT} (the imported 'slicer' module has no vtkMRMLScene)")
    return slicer
