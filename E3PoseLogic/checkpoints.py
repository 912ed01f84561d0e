"""Reading and writing network weights.

Formats, detected from the content (not the file name):
- published U-Net: a Lightning ``.ckpt`` with ``state_dict`` whose network keys start with ``model.``;
- published E3-CNN: a ``.pth`` with ``net_state_dict`` (saved with e3nn 0.5.5; its derived buffers are checked
  against ours instead of loaded, so other e3nn versions work);
- native: one file with weights, the architecture configuration and provenance, loadable with
  ``torch.load(weights_only=True)``. Its ``kind`` says which network: ``unet``, ``e3cnn``, ``refiner``, or
  ``standard_cnn`` (the non-equivariant rotation baseline, ``networks.standard_cnn``), which ``load_e3cnn`` also
  loads: it takes the E3-CNN's place in the pipeline, and its info says ``equivariant: False``.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import CheckpointError

NATIVE_FORMAT = "e3pose-native"
NATIVE_VERSION = 1


def sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _torch_load(path, allow_pickle=False):
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "file not found" if not path.exists() else "is a folder, not a weights file")
    what = _not_a_checkpoint(path)
    if what:
        raise CheckpointError(path, f"not a PyTorch checkpoint: {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = _first_line(exc)
        if "weights only" not in str(exc).lower():  # not the weights_only refusal: the file itself is broken
            raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint (UnpicklingError: {first})") from None
        if not allow_pickle:
            raise CheckpointError(
                path, "contains pickled Python objects that weights_only loading refuses. If you trust this "
                      "file, load it with allow_pickle=True (command line: --allow-pickle), then save it in the "
                      f"native format with `e3pose convert`. ({first})") from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(path, f"cannot be read as a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a class from a module that is not installed, a broken pickle, ...
        first = _first_line(exc)
        raise CheckpointError(path, "cannot be read as a PyTorch checkpoint even with full unpickling "
                                    f"(--allow-pickle): {type(exc).__name__}: {first}") from None


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()  # torch's messages carry terminal colour codes
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _not_a_checkpoint(path: Path, size: int = 4096):
    """What the file is when it clearly is not a PyTorch checkpoint (text, NIfTI, HDF5, ...); None otherwise.

    torch.save writes a zip archive (torch >= 1.6) or a pickle that starts with protocol byte 0x80 (older torch);
    anything else gets a description instead of a misleading unpickling error.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(size)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not head:
        return "the file is empty"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return None
    name = path.name.lower()
    if head.startswith(b"\x1f\x8b"):
        kind = "a NIfTI volume (.nii.gz)" if name.endswith(".nii.gz") else "a gzip-compressed file"
        return f"it is {kind}, not network weights"
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00", b"n+2\x00"):
        return "it is a NIfTI volume, not network weights"
    if head.startswith(b"\x89HDF"):
        return "it is an HDF5 file (e.g. a Keras/TensorFlow model or an ITK transform), not PyTorch weights"
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            first = text.strip().splitlines()[0][:60] if text.strip() else ""
            return f"it is a text file (starting {first!r})" if first else "it is a text file with no content"
    return f"unrecognised content (first bytes {head[:8].hex(' ')}); expected a file written by torch.save"


def detect_format(obj):
    if isinstance(obj, dict):
        if obj.get("format") == NATIVE_FORMAT:
            return "native"
        if "net_state_dict" in obj:
            return "published-e3cnn"
        if "state_dict" in obj and any(k.startswith("model.") for k in obj["state_dict"]):
            return "published-unet"
    return "unknown"


def load_unet(path, allow_pickle=False):
    """-> (UNet in eval mode, info dict)."""
    return _load_network(path, "unet", allow_pickle)


def load_e3cnn(path, allow_pickle=False):
    """-> (rotation network in eval mode, info dict): an E3CNN, or a StandardCNN from a native ``standard_cnn``
    checkpoint (same interface; ``info["architecture"]`` and ``info["equivariant"]`` say which)."""
    return _load_network(path, "e3cnn", allow_pickle)


# native kinds that load_e3cnn accepts: the rotation networks, all with the E3-CNN's pooled interface
ROTATION_KINDS = ("e3cnn", "standard_cnn")


def load_refiner(path):
    """-> (SagittalNet in eval mode, info dict). Native format only: the published method has no refinement."""
    from .networks.sagittal import SagittalConfig, SagittalNet

    return _load_native_only(path, "refiner", "a refinement-network", SagittalConfig, SagittalNet)


def load_residual(path):
    """-> (ResidualNet in eval mode, info dict). Native format only: the published method has no such network."""
    from .networks.residual import ResidualConfig, ResidualNet

    return _load_native_only(path, "residual", "a residual-network", ResidualConfig, ResidualNet)


def load_judge(path):
    """-> (ResidualNet in eval mode, info dict): the frame judge (``judge``), a residual network with the pose logit
    (usually a wider view: ``config.fov``)."""
    net, info = load_residual(path)
    if not getattr(net.config, "pose_logit", False):
        raise CheckpointError(path, "a residual network without the pose logit cannot judge frames "
                                    "(train it with e3pose train-residual --pose-logit)")
    return net, info


def _load_native_only(path, kind, what, config_cls, net_cls):
    """A network that exists only in the native format: checked kind, strict weights, provenance as info."""
    obj = _torch_load(path, allow_pickle=False)
    fmt = detect_format(obj)
    if fmt != "native" or obj.get("kind") != kind:
        raise CheckpointError(path, f"not {what} checkpoint (found: {_describe(obj, fmt)})")
    model = net_cls(config_cls.from_dict(obj["config"]))
    _load_strict(model, obj["state_dict"], path)
    info = {"format": "native", **obj.get("provenance", {})}
    info.update(path=str(path), sha256=sha256(path), config=model.config.to_dict())
    return model.eval(), info


def _load_network(path, kind, allow_pickle):
    from .networks.config import E3CNNConfig, UNetConfig
    from .networks.e3cnn import E3CNN
    from .networks.standard_cnn import StandardCNN, StandardCNNConfig
    from .networks.unet import UNet

    published = {"unet": "published-unet", "e3cnn": "published-e3cnn"}[kind]
    accepted = ROTATION_KINDS if kind == "e3cnn" else (kind,)
    obj = _torch_load(path, allow_pickle)
    fmt = detect_format(obj)
    native_kind = obj.get("kind") if fmt == "native" else None
    if fmt == published and kind == "unet":
        state = {k[len("model."):]: v for k, v in obj["state_dict"].items() if k.startswith("model.")}
        cfg, info = _infer_unet_config(state), {"format": "published-lightning"}
    elif fmt == published:
        state = obj["net_state_dict"]
        cfg, info = _infer_e3cnn_config(state), {"format": "published-pth"}
    elif fmt == "native" and native_kind in accepted:
        state = obj["state_dict"]
        cfg = {"unet": UNetConfig, "e3cnn": E3CNNConfig, "standard_cnn": StandardCNNConfig}[native_kind].from_dict(
            obj["config"])
        info = {"format": "native", **obj.get("provenance", {})}
    else:
        what = "a U-Net checkpoint (" if kind == "unet" else "an E3-CNN checkpoint (nor a standard-CNN one; "
        raise CheckpointError(path, f"not {what}found: {_describe(obj, fmt)})")
    info.setdefault("trained_on", "unknown (published checkpoint)")
    if kind == "unet":
        model = UNet(cfg)
        _load_strict(model, state, path)
    elif native_kind == "standard_cnn":
        try:
            model = StandardCNN(cfg)
        except ValueError as exc:
            raise CheckpointError(path, f"invalid standard-CNN configuration: {exc}") from None
        _load_strict(model, state, path)
        info.update(architecture="standard-cnn", equivariant=False)
    else:
        model = E3CNN(cfg)
        _load_parameters_check_buffers(model, state, path)
        info.update(architecture="e3cnn", equivariant=True)
    info.update(path=str(path), sha256=sha256(path), config=cfg.to_dict())
    return model.eval(), info


def save_native(path, model, kind, provenance=None, extra=None):
    """Write weights + configuration + provenance atomically; loadable with ``weights_only=True``."""
    import torch

    from .atomic import atomic_path

    own_kind = getattr(model, "checkpoint_kind", None)  # the rotation networks say which they are
    if own_kind is not None and kind in ROTATION_KINDS and kind != own_kind:
        raise ValueError(f"save_native: a {type(model).__name__} is saved as kind {own_kind!r}, not {kind!r}")
    if kind in ROTATION_KINDS:
        state = model.learnable_state_dict()
    else:
        state = model.state_dict()
    obj = {
        "format": NATIVE_FORMAT,
        "format_version": NATIVE_VERSION,
        "kind": kind,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "provenance": dict(provenance or {}),
    }
    if extra:
        obj.update(extra)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def _describe(obj, fmt):
    if fmt == "native":
        return f"a native '{obj.get('kind')}' checkpoint"
    if isinstance(obj, dict):
        return "a dict with keys " + ", ".join(sorted(map(str, obj))[:8])
    return type(obj).__name__


def _load_strict(model, state, path):
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(path, f"weights do not fit the network: {str(exc).splitlines()[0]} ...") from None


def _load_parameters_check_buffers(model, state, path, atol=1e-5):
    """Load every learnable parameter; buffers are derived from the architecture, so compare instead of load."""
    import torch

    params = dict(model.named_parameters())
    missing = [k for k in params if k not in state]
    if missing:
        raise CheckpointError(path, f"{len(missing)} parameters missing, e.g. {missing[:3]}")
    wrong = [k for k in params if tuple(state[k].shape) != tuple(params[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(path, f"{len(wrong)} parameters have the wrong shape, e.g. {k}: "
                                    f"{tuple(state[k].shape)} vs {tuple(params[k].shape)}")
    unknown = [k for k in state if k not in params and k not in dict(model.named_buffers())]
    own_buffers = dict(model.named_buffers())
    differing = [k for k, v in state.items() if k in own_buffers and v.shape == own_buffers[k].shape
                 and v.numel() and not torch.allclose(v.float(), own_buffers[k].float(), atol=atol)]
    if differing:
        raise CheckpointError(path, f"derived buffers differ from this architecture ({differing[:3]}): "
                                    "the checkpoint was built with another configuration")
    if unknown and not all("_w3j" in k for k in unknown):
        raise CheckpointError(path, f"unexpected entries, e.g. {[k for k in unknown if '_w3j' not in k][:3]}")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def _infer_unet_config(state):
    from .networks.config import UNetConfig

    enc = sorted({int(k.split(".")[1]) for k in state if k.startswith("list_encoder_blocks.")})
    first = state["list_encoder_blocks.0.0.weight"]
    n_conv = len({k.split(".")[2] for k in state if k.startswith("list_encoder_blocks.0.")
                  and k.endswith(".weight") and state[k].dim() == 5})
    feat1 = state["list_encoder_blocks.1.0.weight"].shape[0] if len(enc) > 1 else first.shape[0] * 2
    return UNetConfig(in_channels=first.shape[1], out_channels=state["last_conv.weight"].shape[0],
                      n_levels=len(enc), n_feat=first.shape[0], feat_mult=feat1 // first.shape[0],
                      n_conv=n_conv, kernel_size=first.shape[-1])


def _infer_e3cnn_config(state):
    """The published checkpoints all use the published layout; the level count and width come from the keys."""
    from .networks.config import E3CNNConfig

    levels = sorted({int(k.split(".")[3]) for k in state if k.startswith("net.down.down_blocks.")})
    # level-0 norm: one weight per irrep copy: 4m + 4m scalars, 6m gates, 2m + 2m + m + m gated = 20 m
    mult = state["net.down.down_blocks.0.batchnorm1.weight"].shape[0] // 20 if \
        "net.down.down_blocks.0.batchnorm1.weight" in state else 2
    sh_dim = state["net.down.down_blocks.0.conv1.sh"].shape[-1] if "net.down.down_blocks.0.conv1.sh" in state else 25
    lmax = int(round(sh_dim ** 0.5)) - 1
    return E3CNNConfig(n_downsample=len(levels) - 1, mult=mult, lmax=lmax)
