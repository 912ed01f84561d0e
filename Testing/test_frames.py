"""Frame conventions: RAS vs LPS (nibabel, SimpleITK, Slicer), (i, j, k) vs (k, j, i), ITK transform files."""
from __future__ import annotations

import numpy as np
import pytest

from _support import rotation as rot
from E3PoseLogic import frames
from E3PoseLogic.errors import InputError

F = np.diag([-1.0, -1.0, 1.0, 1.0])


def affine(d=None, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = (np.eye(3) if d is None else d) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


OBLIQUE = affine(rot("z", 25) @ rot("x", -40) @ rot("y", 10), (0.9, 1.3, 2.7), (-71.5, 12.25, 33.0))
MIRRORED = affine(rot("y", 33) @ rot("z", -12) @ np.diag([-1.0, 1.0, 1.0]), (1.25, 1.25, 3.0), (40.0, -95.5, 7.0))
POSE = affine(rot("z", 35) @ rot("x", -25) @ rot("y", 15), origin=(6.0, -4.0, 10.0))
POSE_SCALED = POSE @ np.diag([1.1, 0.9, 1.0, 1.0])


def random_volume(shape=(7, 9, 11), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------- nibabel vs SimpleITK
@pytest.mark.parametrize("aff", [OBLIQUE, MIRRORED], ids=["oblique", "mirrored"])
def test_nifti_written_by_nibabel_read_by_simpleitk(tmp_path, aff):
    import nibabel as nib
    import SimpleITK as sitk

    a = random_volume()
    path = tmp_path / "v.nii.gz"
    nib.Nifti1Image(a, aff).to_filename(str(path))
    nib_aff = nib.load(str(path)).affine  # float32 header values: compare with what was stored
    img = sitk.ReadImage(str(path))
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    assert np.allclose(F @ lps, nib_aff, atol=1e-5)
    assert np.allclose(frames.ijk_to_ras_from_sitk(img), nib_aff, atol=1e-5)
    # SimpleITK's numpy view is (k, j, i)
    assert np.array_equal(frames.kji_to_ijk(sitk.GetArrayFromImage(img)), a)


def test_sitk_geometry_round_trip():
    import SimpleITK as sitk

    for aff in (OBLIQUE, MIRRORED):
        img = sitk.Image(4, 5, 6, sitk.sitkFloat32)
        origin, spacing, direction = frames.sitk_geometry(aff)
        img.SetOrigin(origin)
        img.SetSpacing(spacing)
        img.SetDirection(direction)
        assert np.allclose(frames.ijk_to_ras_from_sitk(img), aff, atol=1e-12)
        # a voxel index maps to the same world point in both libraries
        p_lps = img.TransformContinuousIndexToPhysicalPoint((1.5, 2.0, 3.25))
        assert np.allclose(F[:3, :3] @ p_lps, frames.apply(aff, [1.5, 2.0, 3.25]), atol=1e-9)


# ---------------------------------------------------------------------------------------------- arrays
def test_kji_ijk_transposes():
    a = random_volume()
    k = frames.ijk_to_kji(a)
    assert k.shape == (11, 9, 7) and k[3, 2, 1] == a[1, 2, 3]
    assert np.array_equal(frames.kji_to_ijk(k), a)
    v = np.zeros((4, 5, 6, 3))
    assert frames.kji_to_ijk(v).shape == (6, 5, 4, 3)
    with pytest.raises(ValueError):
        frames.kji_to_ijk(np.zeros((3, 3)))


@pytest.mark.mrml
def test_kji_ijk_against_slicer_array_from_volume(tmp_path):
    slicer = pytest.importorskip("slicer")
    import nibabel as nib
    import vtk

    a = random_volume()
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "v")
    slicer.util.updateVolumeFromArray(node, frames.ijk_to_kji(a))
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(OBLIQUE))
    assert node.GetImageData().GetDimensions() == a.shape  # VTK dimensions are (i, j, k)
    assert np.array_equal(frames.kji_to_ijk(slicer.util.arrayFromVolume(node)), a)

    # NIfTI files read by Slicer's own reader: the same voxels at the same world positions as nibabel's
    for name, aff in (("o", OBLIQUE), ("m", MIRRORED)):
        path = tmp_path / f"{name}.nii.gz"
        nib.Nifti1Image(a, aff).to_filename(str(path))
        v2 = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        sn = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        sn.SetFileName(str(path))
        assert sn.ReadData(v2) == 1
        m = vtk.vtkMatrix4x4()
        v2.GetIJKToRASMatrix(m)
        slicer_aff = slicer.util.arrayFromVTKMatrix(m)
        slicer_arr = frames.kji_to_ijk(slicer.util.arrayFromVolume(v2))
        nib_aff = nib.load(str(path)).affine
        if np.linalg.det(aff[:3, :3]) > 0:
            assert np.allclose(slicer_aff, nib_aff, atol=1e-5)
            assert np.array_equal(slicer_arr, a)
        else:
            # Slicer stores a left-handed grid with its k axis reversed (SimpleITK and nibabel do not): other array
            # and matrix, same world geometry. Why the pipeline takes (array, ijk_to_ras) pairs, never bare indices.
            flip_k = np.eye(4)
            flip_k[2, 2], flip_k[2, 3] = -1.0, a.shape[2] - 1
            assert np.allclose(slicer_aff, nib_aff @ flip_k, atol=1e-5)
            assert np.array_equal(slicer_arr, a[:, :, ::-1])


# ---------------------------------------------------------------------------------------------- grids
def test_direction_cosines_and_voxel_sizes():
    d = frames.direction_cosines(OBLIQUE)
    assert np.allclose(d.T @ d, np.eye(3)) and np.isclose(np.linalg.det(d), 1.0)
    assert np.allclose(frames.voxel_sizes(OBLIQUE), [0.9, 1.3, 2.7])


def test_direction_cosines_mirrored_has_det_minus_one():
    d = frames.direction_cosines(MIRRORED)
    assert np.allclose(d.T @ d, np.eye(3))
    assert np.isclose(np.linalg.det(d), -1.0)  # kept as is (upstream get_rot_from_aff), not "fixed"
    assert np.allclose(d * frames.voxel_sizes(MIRRORED), MIRRORED[:3, :3])
    assert np.allclose(frames.voxel_sizes(MIRRORED), [1.25, 1.25, 3.0])


def test_shear_detection():
    assert frames.shear_error(OBLIQUE) < 1e-12
    frames.check_not_sheared(OBLIQUE)
    frames.check_grid(MIRRORED)
    sheared = OBLIQUE.copy()
    sheared[:3, 1] += 0.05 * sheared[:3, 0]
    assert frames.shear_error(sheared) > 1e-2
    with pytest.raises(InputError, match="not orthogonal"):
        frames.check_not_sheared(sheared, "x.nii.gz")
    with pytest.raises(InputError, match="x.nii.gz"):
        frames.check_grid(sheared, "x.nii.gz")
    flat = OBLIQUE.copy()
    flat[:3, 2] = 0
    with pytest.raises(InputError, match="voxel size is zero"):
        frames.check_grid(flat)
    nan = OBLIQUE.copy()
    nan[0, 3] = np.nan
    with pytest.raises(InputError, match="finite"):
        frames.check_grid(nan)


def test_rigid_inverse_and_apply():
    inv = frames.rigid_inverse(POSE)
    assert np.allclose(inv @ POSE, np.eye(4), atol=1e-12)
    pts = np.random.default_rng(1).normal(size=(5, 2, 3)) * 50
    assert frames.apply(POSE, pts).shape == (5, 2, 3)
    assert np.allclose(frames.apply(inv, frames.apply(POSE, pts)), pts)
    assert np.allclose(frames.apply(POSE, [0, 0, 0]), POSE[:3, 3])
    with pytest.raises(ValueError):
        frames.rigid_inverse(POSE_SCALED)


def test_canonical_to_voxel_one_implementation():
    """PoseResult, the Slicer export and the command line share ``frames.canonical_to_voxel``; without a voxel-frame
    rotation the PoseResult form is derived from the world rotation (it used to fall back to the world rotation
    itself, wrong on any oblique or mirrored grid; issue 9, section 4)."""
    from E3PoseLogic.mrml import export
    from E3PoseLogic.result import PoseResult

    assert export.canonical_to_voxel is frames.canonical_to_voxel
    for grid in (OBLIQUE, MIRRORED):
        d = frames.direction_cosines(grid)
        flip = np.diag([np.sign(np.linalg.det(d)), 1.0, 1.0])
        r_vox = d.T @ POSE[:3, :3] @ flip
        with_vox = PoseResult(rotation=POSE[:3, :3], translation=POSE[:3, 3], brain_mask=None, ijk_to_ras=grid,
                              rotation_voxel=r_vox)
        without = PoseResult(rotation=POSE[:3, :3], translation=POSE[:3, 3], brain_mask=None, ijk_to_ras=grid)
        np.testing.assert_allclose(without.canonical_to_voxel(), with_vox.canonical_to_voxel(), atol=1e-12)
        assert np.array_equal(with_vox.canonical_to_voxel()[:3, :3], r_vox)  # as given: the published .npy
        np.testing.assert_allclose(with_vox.canonical_to_voxel()[:3, 3],
                                   np.linalg.solve(grid, np.append(POSE[:3, 3], 1.0))[:3], atol=1e-9)


def test_one_implementation_each():
    """Helpers that existed twice with different behaviour now exist once (issue 9, section 4)."""
    from E3PoseLogic import atomic, augment, preprocess, volume_io
    from E3PoseLogic.mrml import export, nodes

    assert export.atomic_path is atomic.atomic_path  # fsyncs before the rename
    assert nodes.rigid_inverse is export.rigid_inverse is frames.rigid_inverse
    assert augment.minmax is preprocess.minmax  # torchio's: a constant image is returned unchanged
    assert nodes.load_volume.__module__ == "E3PoseLogic.mrml.nodes"  # a scene adapter over volume_io's reader
    assert "read_volume(path" in __import__("inspect").getsource(nodes.load_volume)
    assert volume_io.load_volume.__module__ == "E3PoseLogic.volume_io"
    try:
        import torch  # noqa: F401
    except ImportError:
        return
    from E3PoseLogic import pipeline
    from E3PoseLogic.training import common

    assert common.resolve_device is pipeline.resolve_device


def test_lps_constant_is_read_only():
    with pytest.raises(ValueError):
        frames.LPS_FROM_RAS[0, 0] = 1.0


# ---------------------------------------------------------------------------------------------- ITK transform files
def _slicer_to_parent_from_itk_file(path):
    """The relation measured in the slicer-core probe, evaluated with SimpleITK parameters (independent path)."""
    import SimpleITK as sitk

    t = sitk.ReadTransform(str(path))
    if t.GetName() == "CompositeTransform":
        t = t.GetNthTransform(0)
    p = np.array(t.GetParameters())
    a, tr, c = p[:9].reshape(3, 3), p[9:12], np.array(t.GetFixedParameters())
    f_lps = np.eye(4)
    f_lps[:3, :3] = a
    f_lps[:3, 3] = tr + c - a @ c
    return np.linalg.inv(F @ f_lps @ F)


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".h5", ".mat"])
@pytest.mark.parametrize("t", [POSE, POSE_SCALED], ids=["rigid", "affine"])
def test_itk_transform_round_trip(tmp_path, suffix, t):
    path = tmp_path / f"pose{suffix}"
    assert frames.write_itk_transform(path, t) == path
    assert np.allclose(frames.read_itk_transform(path), t, atol=1e-10)
    if suffix != ".mat":  # the MATLAB format stores only the parameters, SimpleITK reads it back the same way
        assert np.allclose(_slicer_to_parent_from_itk_file(path), t, atol=1e-10)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_itk_transform_with_centre_and_other_types(tmp_path):
    import SimpleITK as sitk

    # a rigid Euler transform with a centre of rotation, written by SimpleITK: read as ToParent = inv(F @ F_lps @ F)
    e = sitk.Euler3DTransform((10.0, -20.0, 5.0), 0.3, -0.2, 0.7, (4.0, 5.0, -6.0))
    path = tmp_path / "euler.tfm"
    sitk.WriteTransform(e, str(path))
    got = frames.read_itk_transform(path)
    f_lps = np.eye(4)
    f_lps[:3, :3] = np.array(e.GetMatrix()).reshape(3, 3)
    f_lps[:3, 3] = e.TransformPoint((0.0, 0.0, 0.0))
    assert np.allclose(got, np.linalg.inv(F @ f_lps @ F), atol=1e-10)


def test_itk_transform_errors(tmp_path):
    import SimpleITK as sitk

    with pytest.raises(InputError, match="not found"):
        frames.read_itk_transform(tmp_path / "missing.tfm")
    bad = tmp_path / "bad.tfm"
    bad.write_text("not a transform\n")
    with pytest.raises(InputError, match="bad.tfm"):
        frames.read_itk_transform(bad)
    bs = sitk.BSplineTransform(3)
    bs.SetTransformDomainOrigin((0.0, 0.0, 0.0))
    bs.SetTransformDomainPhysicalDimensions((100.0, 100.0, 100.0))
    bs.SetTransformDomainMeshSize((2, 2, 2))
    params = np.zeros(bs.GetNumberOfParameters())
    params[::7] = 3.0
    bs.SetParameters(params.tolist())
    nonlinear = tmp_path / "bspline.tfm"
    sitk.WriteTransform(bs, str(nonlinear))
    with pytest.raises(InputError, match="not a linear"):
        frames.read_itk_transform(nonlinear)
    with pytest.raises(ValueError, match="unsupported"):
        frames.write_itk_transform(tmp_path / "pose.json", POSE)


@pytest.mark.mrml
@pytest.mark.parametrize("suffix", [".tfm", ".h5"])
def test_itk_transform_against_slicer_storage_node(tmp_path, suffix):
    slicer = pytest.importorskip("slicer")
    import vtk

    scene = slicer.vtkMRMLScene()

    # our file, read by Slicer's own storage node: ToParent == what we asked for
    ours = tmp_path / f"ours{suffix}"
    frames.write_itk_transform(ours, POSE_SCALED)
    tn = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "read")
    rn = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(rn)
    rn.SetFileName(str(ours))
    assert rn.ReadData(tn) == 1
    m = vtk.vtkMatrix4x4()
    tn.GetMatrixTransformToParent(m)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(m), POSE_SCALED, atol=1e-10)

    # a file written by Slicer (it stores a non-zero centre), read by us
    tn2 = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "written")
    tn2.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(POSE))
    theirs = tmp_path / f"theirs{suffix}"
    wn = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(wn)
    wn.SetFileName(str(theirs))
    assert wn.WriteData(tn2) == 1
    assert np.allclose(frames.read_itk_transform(theirs), POSE, atol=1e-10)
