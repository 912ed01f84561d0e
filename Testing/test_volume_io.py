"""NIfTI reading with named refusals, mask mapping, atomic writing, input discovery."""
from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest

from _support import rotation as rot
from E3PoseLogic import atomic, volume_io
from E3PoseLogic.errors import InputError
from E3PoseLogic.volume_io import iter_inputs, load_mask, load_volume, save_volume, volume_name


AFF = np.eye(4)
AFF[:3, :3] = rot("z", 20) @ rot("x", -30) @ np.diag([1.5, 1.5, 2.5])
AFF[:3, 3] = [-60.0, 25.0, -12.5]


def volume(shape=(16, 18, 12), seed=0):
    return (np.random.default_rng(seed).random(shape) * 1000).astype(np.float32)


def write(path, data, aff=AFF):
    import nibabel as nib

    img = nib.Nifti1Image(data, aff)
    img.to_filename(str(path))
    return path


# ---------------------------------------------------------------------------------------------- load_volume
def test_load_volume_returns_nibabel_array_and_affine(tmp_path):
    import nibabel as nib

    a = volume()
    p = write(tmp_path / "v.nii.gz", a)
    arr, aff = load_volume(p)
    assert arr.dtype == np.float32 and aff.dtype == np.float64
    assert np.array_equal(arr, a)
    assert np.array_equal(aff, nib.load(str(p)).affine)
    p2 = write(tmp_path / "v.nii", a.astype(np.int16))
    assert np.array_equal(load_volume(p2)[0], a.astype(np.int16))


def test_load_volume_squeezes_trailing_singleton(tmp_path):
    a = volume()
    arr, _ = load_volume(write(tmp_path / "v.nii.gz", a[..., None]))
    assert arr.shape == a.shape and np.array_equal(arr, a)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        load_volume(tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match="folder"):
        load_volume(tmp_path)
    good = write(tmp_path / "v.nii.gz", volume())
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        load_volume(truncated)
    assert e.value.source == str(truncated)
    short = tmp_path / "short.nii"
    short.write_bytes(gzip.decompress(raw)[:5000])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_volume(short)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"definitely not a NIfTI file")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_volume(junk)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="not a readable NIfTI"):
        load_volume(empty)


def test_4d_and_non_3d(tmp_path):
    series = np.stack([volume(seed=s) for s in range(5)], -1)
    with pytest.raises(InputError, match=r"4D series of 5 volumes.*extract the volume"):
        load_volume(write(tmp_path / "fmri.nii.gz", series))
    with pytest.raises(InputError, match="not a 3D volume"):
        load_volume(write(tmp_path / "2d.nii.gz", volume()[:, :, 0]))


def test_non_finite_empty_small(tmp_path):
    a = volume()
    a[1, 2, 3] = np.nan
    a[4, 5, 6] = np.inf
    with pytest.raises(InputError, match="2 of .* voxels are not finite"):
        load_volume(write(tmp_path / "nan.nii.gz", a))
    with pytest.raises(InputError, match="empty: every voxel has the value 0"):
        load_volume(write(tmp_path / "zeros.nii.gz", np.zeros((16, 16, 16), np.float32)))
    with pytest.raises(InputError, match="empty: every voxel has the value 7"):
        load_volume(write(tmp_path / "const.nii.gz", np.full((16, 16, 16), 7, np.int16)))
    with pytest.raises(InputError, match="too small.*at least 8"):
        load_volume(write(tmp_path / "small.nii.gz", volume((16, 16, 5))))


def test_colour_and_vector_images_named(tmp_path):
    """An RGB NIfTI is a colour image, not a "truncated or corrupt" file; a vector image likewise (issue 9, 3.6)."""
    import nibabel as nib

    rgb = np.zeros((16, 16, 16), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    p = tmp_path / "rgb.nii.gz"
    nib.save(nib.Nifti1Image(rgb, AFF), str(p))
    for load in (load_volume, lambda q: load_mask(q, AFF, (16, 16, 16))):
        with pytest.raises(InputError) as e:
            load(p)
        msg = str(e.value)
        assert "an RGB colour image (3 channels R, G, B per voxel" in msg and "scalar 3D volume" in msg, msg
        assert "truncated" not in msg and "corrupt" not in msg
    vec = nib.Nifti1Image(volume((16, 16, 16, 1, 3)), AFF)
    vec.header.set_intent("vector")
    nib.save(vec, str(tmp_path / "vec.nii.gz"))
    with pytest.raises(InputError, match=r"a vector image \(3 components per voxel.*scalar 3D volume"):
        load_volume(tmp_path / "vec.nii.gz")


def test_load_volume_labels(tmp_path):
    """``labels=True``: integer label maps, any size, constant (empty) allowed; the volume checks otherwise."""
    lab = np.zeros((6, 7, 5), np.uint8)
    lab[2:4, 3:5, 1:3] = 2
    arr, aff = load_volume(write(tmp_path / "lab.nii.gz", lab), labels=True)
    assert arr.dtype == np.int16 and np.array_equal(arr, lab)
    np.testing.assert_allclose(aff, AFF, atol=1e-5)
    empty, _ = load_volume(write(tmp_path / "empty.nii.gz", np.zeros((6, 7, 5), np.uint8)), labels=True)
    assert not empty.any()
    with pytest.raises(InputError, match="too small"):  # as a volume it is refused
        load_volume(tmp_path / "lab.nii.gz")


def test_sheared_affine_refused(tmp_path):
    sheared = AFF.copy()
    sheared[:3, 2] += 0.3 * sheared[:3, 0]
    with pytest.raises(InputError, match="not orthogonal.*sheared"):
        load_volume(write(tmp_path / "shear.nii.gz", volume(), sheared))


def _qform_only_with_pixdim(path, pixdim1):
    import nibabel as nib

    img = nib.Nifti1Image(volume(), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header.set_sform(None, code=0)
    img.header.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
    img.to_filename(str(path))
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", pixdim1)  # pixdim[1]: nibabel would quietly take abs() / replace 0 by 1
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("value", [-2.0, 0.0])
def test_zero_or_negative_voxel_size_refused(tmp_path, value):
    with pytest.raises(InputError, match="voxel size is zero or negative"):
        load_volume(_qform_only_with_pixdim(tmp_path / "bad.nii", value))
    p = write(tmp_path / "flat.nii", volume(), np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = bytearray(p.read_bytes())
    for row in (280, 296, 312):  # srow_x/y/z: a zero second column in the sform
        raw[row + 4 : row + 8] = struct.pack("<f", 0.0)
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="voxel size is zero"):
        load_volume(p)


# ---------------------------------------------------------------------------------------------- load_mask
def _ball(shape, aff, centre_world, radius):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    w = ijk @ aff[:3, :3].T + aff[:3, 3]
    return (((w - centre_world) ** 2).sum(-1) <= radius**2).astype(np.uint8)


def test_load_mask_same_grid_and_labels(tmp_path):
    shape = (16, 18, 12)
    centre = AFF[:3, :3] @ (np.array(shape) / 2) + AFF[:3, 3]
    ball = _ball(shape, AFF, centre, 8.0)
    got = load_mask(write(tmp_path / "m.nii.gz", ball), AFF, shape)
    assert got.dtype == np.uint8 and np.array_equal(got, ball)
    labels = ball.copy()
    labels[0:3, 0:3, 0:3] = 2  # eyes label: not brain
    got = load_mask(write(tmp_path / "labels.nii.gz", labels), AFF, shape)
    assert np.array_equal(got, (labels == 1).astype(np.uint8))
    prob = ball.astype(np.float32) * 0.9 + 0.05  # probabilities: > 0.5 is brain
    assert np.array_equal(load_mask(write(tmp_path / "p.nii.gz", prob), AFF, shape), ball)


def test_load_mask_on_another_grid(tmp_path):
    shape = (40, 40, 30)
    centre = AFF[:3, :3] @ (np.array(shape) / 2) + AFF[:3, 3]
    # the mask drawn on a finer, differently rotated grid covering the same region
    fine = np.eye(4)
    fine[:3, :3] = rot("y", 40) @ np.diag([1.0, 1.0, 1.0])
    fine_shape = (90, 90, 90)
    fine[:3, 3] = centre - fine[:3, :3] @ ((np.array(fine_shape) - 1) / 2)
    ball_fine = _ball(fine_shape, fine, centre, 15.0)
    got = load_mask(write(tmp_path / "m.nii.gz", ball_fine, fine), AFF, shape)
    want = _ball(shape, AFF, centre, 15.0)
    assert got.shape == shape
    assert np.count_nonzero(got != want) <= 0.1 * want.sum()  # only boundary voxels may differ
    assert np.abs(got.sum() - want.sum()) <= 0.1 * want.sum()


def test_load_mask_errors(tmp_path):
    shape = (16, 18, 12)
    with pytest.raises(InputError, match="file not found"):
        load_mask(tmp_path / "none.nii.gz", AFF, shape)
    with pytest.raises(InputError, match="mask is empty"):
        load_mask(write(tmp_path / "e.nii.gz", np.zeros(shape, np.uint8)), AFF, shape)
    with pytest.raises(InputError, match="4D series"):
        load_mask(write(tmp_path / "4d.nii.gz", np.ones(shape + (3,), np.uint8)), AFF, shape)
    far = AFF.copy()
    far[:3, 3] += 1000.0
    with pytest.raises(InputError, match="does not overlap"):
        load_mask(write(tmp_path / "far.nii.gz", np.ones(shape, np.uint8), far), AFF, shape)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"xx")
    with pytest.raises(InputError, match="not a readable"):
        load_mask(bad, AFF, shape)


# ---------------------------------------------------------------------------------------------- writing
def test_save_volume_round_trip(tmp_path):
    import nibabel as nib

    a = volume()
    p = save_volume(tmp_path / "out.nii.gz", a, AFF, np.float32)
    arr, aff = load_volume(p)
    assert np.array_equal(arr, a)
    assert np.allclose(aff, AFF, atol=1e-5)
    hdr = nib.load(str(p)).header
    assert int(hdr["sform_code"]) == 1 and int(hdr["qform_code"]) == 1
    assert np.allclose(hdr.get_qform(), AFF, atol=1e-4)
    m = save_volume(tmp_path / "mask.nii", (a > 500), AFF, np.uint8)
    assert nib.load(str(m)).get_data_dtype() == np.uint8
    with pytest.raises(ValueError):
        save_volume(tmp_path / "out.npy", a, AFF)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii", "out.nii.gz"]


def test_save_volume_failure_keeps_previous_file(tmp_path, monkeypatch):
    import nibabel as nib

    p = save_volume(tmp_path / "out.nii.gz", volume(seed=1), AFF)
    before = p.read_bytes()

    def boom(self, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_volume(p, volume(seed=2), AFF)
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["out.nii.gz"]


# ---------------------------------------------------------------------------------------------- atomic
@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_path_exception_keeps_previous_file(tmp_path, exc):
    final = tmp_path / "result.nii.gz"
    final.write_bytes(b"previous")
    with pytest.raises(type(exc)):
        with atomic.atomic_path(final) as tmp:
            assert tmp.parent == final.parent and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
            tmp.write_bytes(b"half writ")
            raise exc
    assert final.read_bytes() == b"previous"
    assert [q.name for q in tmp_path.iterdir()] == ["result.nii.gz"]


def test_atomic_helpers(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "hello")
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic.save_npy(tmp_path / "pose.npy", np.eye(4))
    atomic.save_npy(tmp_path / "noext", np.arange(3))  # np.save would have written noext.npy
    atomic.save_json(tmp_path / "sub" / "r.json", {"m": np.eye(2), "x": np.float32(1.5), "p": tmp_path})
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert np.array_equal(np.load(tmp_path / "pose.npy"), np.eye(4))
    assert np.array_equal(np.load(tmp_path / "noext"), np.arange(3))
    d = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert d == {"m": [[1.0, 0.0], [0.0, 1.0]], "x": 1.5, "p": str(tmp_path)}
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.txt", "b.bin", "noext", "pose.npy", "sub"]
    with pytest.raises(TypeError):
        atomic.save_json(tmp_path / "bad.json", {"o": object()})
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(FileNotFoundError):
        with atomic.atomic_path(tmp_path / "never.txt"):
            pass


def test_atomic_paths_replace_a_set_only_when_complete(tmp_path):
    """A set of files replaces the earlier set only once every new file is written (issue 9, 3.5)."""
    finals = [tmp_path / "r_mask.nii.gz", tmp_path / "r.npy", tmp_path / "r.json"]
    for f in finals:
        f.write_bytes(b"old " + f.name.encode())
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_paths(finals) as tmps:
            assert [t.parent for t in tmps] == [tmp_path] * 3 and all(t.name.startswith(".") for t in tmps)
            tmps[0].write_bytes(b"new mask")
            tmps[1].write_bytes(b"new npy")
            raise KeyboardInterrupt  # before the JSON: nothing of the new set may show
    assert [f.read_bytes() for f in finals] == [b"old " + f.name.encode() for f in finals]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in finals)
    with atomic.atomic_paths(finals) as tmps:
        for t, f in zip(tmps, finals):
            t.write_bytes(b"new " + f.name.encode())
    assert [f.read_bytes() for f in finals] == [b"new " + f.name.encode() for f in finals]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in finals)


def test_atomic_temporaries_have_valid_names_for_any_final_name(tmp_path):
    """A final name that is not valid UTF-8 (latin-1 bytes on disk) gets an ASCII temporary with its suffixes:
    C++ writers (ITK) abort the process on such a name (issue 9, 3.2)."""
    import os

    final = tmp_path / os.fsdecode(b"latin1_\xe9.nii.gz")
    with atomic.atomic_path(final) as tmp:
        assert tmp.name.isascii() and tmp.name.endswith(".nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"data")
    assert final.read_bytes() == b"data"
    assert os.listdir(os.fsencode(tmp_path)) == [b"latin1_\xe9.nii.gz"]
    with atomic.native_path(final, write=False) as native:
        assert native.isascii() and open(native, "rb").read() == b"data"
    with atomic.native_path(final) as native:
        native.encode("utf-8")
        with open(native, "wb") as f:
            f.write(b"rewritten")
    assert final.read_bytes() == b"rewritten"
    with atomic.native_path(tmp_path / "plain.tfm") as native:
        assert native == str(tmp_path / "plain.tfm")


# ---------------------------------------------------------------------------------------------- inputs, names
def test_volume_name():
    assert volume_name("/x/case1.nii.gz") == "case1"
    assert volume_name("sub-01_run.2.nii") == "sub-01_run.2"
    assert volume_name("sub-01.ses-2.NII.GZ") == "sub-01.ses-2"
    assert volume_name("scan.nrrd") == "scan"


def test_iter_inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for n in ["b.nii.gz", "a.nii", "c.v2.nii.gz", ".hidden.nii.gz", "notes.txt", ".abc.tmp.x.nii.gz"]:
        (d / n).write_bytes(b"")
    (d / "sub").mkdir()
    (d / "sub" / "deep.nii").write_bytes(b"")
    single = tmp_path / "single.nii.gz"
    single.write_bytes(b"")
    got = [p.name for p in iter_inputs([single, d])]
    assert got == ["single.nii.gz", "a.nii", "b.nii.gz", "c.v2.nii.gz"]
    assert [p.name for p in iter_inputs(str(d))] == ["a.nii", "b.nii.gz", "c.v2.nii.gz"]
    with pytest.raises(InputError, match="no such file or folder"):
        list(iter_inputs([tmp_path / "missing"]))
    assert volume_io.is_nifti("x.NII.GZ") and not volume_io.is_nifti("x.nrrd")
