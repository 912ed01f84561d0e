"""networks.conv3d (oneDNN for single-volume CPU convolutions), refine.sample_trilinear (grid_sample over threads) and
refine.linear_at (map_coordinates over threads): speed changes only, so each must give what the plain call gives."""
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from E3PoseLogic.networks.conv3d import Conv3d, onednn_applies  # noqa: E402

ONEDNN = torch.backends.mkldnn.is_available()


def _pair(c_in=16, c_out=16, k=3, seed=0):
    torch.manual_seed(seed)
    plain = nn.Conv3d(c_in, c_out, k, padding=k // 2)
    fast = Conv3d(c_in, c_out, k, padding=k // 2)
    fast.load_state_dict(plain.state_dict())  # same parameters, same keys
    return plain.eval(), fast.eval()


def _ops(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_same_state_dict_keys_as_nn_conv3d():
    plain, fast = _pair()
    assert list(plain.state_dict()) == list(fast.state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("shape", [(1, 16, 16, 16, 16), (1, 1, 20, 18, 16), (2, 16, 12, 12, 12)])
def test_values_match_the_plain_convolution(shape):
    plain, fast = _pair(c_in=shape[1])
    x = torch.randn(*shape)
    with torch.inference_mode():
        a, b = plain(x), fast(x)
    assert a.shape == b.shape
    # float32 rounding of a 27 x 16-term sum in another order: far below 1e-4 of the output's scale
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


@pytest.mark.skipif(not ONEDNN, reason="this PyTorch build has no oneDNN")
def test_single_volume_inference_runs_in_onednn_channels_last():
    """The case PyTorch's own rule sends to its generic loop (1 x 16 x 16 x 16 is below 20,480)."""
    plain, fast = _pair()
    x = torch.randn(1, 16, 16, 16, 16)
    with torch.inference_mode():
        assert onednn_applies(x, fast.weight)
        assert "aten::mkldnn_convolution" in _ops(lambda: fast(x))
        assert "aten::mkldnn_convolution" not in _ops(lambda: plain(x))  # the rule this module works around
        assert fast(x).is_contiguous(memory_format=torch.channels_last_3d)


def test_training_keeps_pytorchs_own_path_and_gradients():
    plain, fast = _pair()
    fast.train()
    x = torch.randn(1, 16, 8, 8, 8, requires_grad=True)
    assert not onednn_applies(x, fast.weight)
    fast(x).square().sum().backward()
    plain.train()
    x2 = x.detach().clone().requires_grad_(True)
    plain(x2).square().sum().backward()
    assert torch.allclose(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_other_dtypes_keep_pytorchs_own_path():
    _, fast = _pair()
    fast = fast.double()
    x = torch.randn(1, 16, 8, 8, 8, dtype=torch.float64)
    with torch.inference_mode():
        assert not onednn_applies(x, fast.weight)
        assert fast(x).dtype == torch.float64


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("total", [5000, 12289, 40000])
def test_sample_trilinear_equals_one_grid_sample_call(threads, total):
    from E3PoseLogic.refine import sample_trilinear

    torch.manual_seed(1)
    cube = torch.rand(1, 1, 10, 11, 12)
    points = torch.rand(total, 3) * 2.4 - 1.2  # some outside the cube: zeros there
    ref = F.grid_sample(cube, points.reshape(1, -1, 1, 1, 3), mode="bilinear", padding_mode="zeros",
                        align_corners=True).reshape(-1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = sample_trilinear(cube, points)
    finally:
        torch.set_num_threads(before)
    assert got.shape == (total,)
    assert torch.equal(got, ref)  # each point is interpolated by the same code: the same bits


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("min_chunk", [10, 1000, 10 ** 9])
def test_linear_at_equals_one_map_coordinates_call(min_chunk, threads):
    import numpy as np
    from scipy import ndimage

    from E3PoseLogic.refine import linear_at

    rng = np.random.default_rng(2)
    volume = rng.random((9, 10, 11)).astype(np.float32)
    coords = rng.uniform(-1.5, 11.5, size=(3, 5003))  # some outside: zeros there
    ref = ndimage.map_coordinates(volume, coords, order=1, mode="constant", cval=0.0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)  # the number of chunks follows torch's threads
        got = linear_at(volume, coords, min_chunk=min_chunk)
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(got, ref)


def test_sample_slabs_of_several_slabs_equal_each_alone():
    import numpy as np

    from E3PoseLogic.refine import sample_slabs

    rng = np.random.default_rng(3)
    cube = rng.random((20, 20, 20)).astype(np.float32)
    points = rng.uniform(-25.0, 25.0, size=(5, 2, 2, 6, 6, 3))  # 5 slabs of [C=2, 2 sides, 6, 6] points, mm
    together = sample_slabs(cube, 2.5, points)
    assert together.shape == (5, 2, 6, 6)
    for k in range(5):
        assert np.array_equal(together[k], sample_slabs(cube, 2.5, points[k]))
