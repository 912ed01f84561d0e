"""Bundled models: where they live, what they were trained on, and the random-weight placeholder.

A model is a pair of native checkpoint files (U-Net + E3-CNN) in ``E3PoseLogic/data/models/<name>/`` with a
``model_card.json``. ``default_model()`` picks the shipped default; when no trained model ships, it returns the
random-weight placeholder, flagged ``random_weights`` so every output says it is not trained.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"
DEFAULT_NAME = "default"
RANDOM_WARNING = ("THIS MODEL HAS RANDOM WEIGHTS: it is NOT trained and its poses are meaningless. "
                  "Use it only to check that the software runs.")


@dataclass
class ModelSpec:
    name: str
    unet: Optional[Path]
    e3cnn: Optional[Path]
    card: dict = field(default_factory=dict)
    refiner: Optional[Path] = None  # the refinement network (``refine``), when the model has one
    residual: Optional[Path] = None  # the residual network (``residual``), the refinement's last step
    judge: Optional[Path] = None  # the frame judge (``judge``), checks the residual network's frame

    @property
    def random_weights(self):
        return self.unet is None or self.e3cnn is None

    @property
    def warning(self):
        return RANDOM_WARNING if self.random_weights else self.card.get("warning")

    @property
    def label(self):
        """How the model is offered to users: always says synthetic / random where that is the truth."""
        if self.random_weights:
            return f"{self.name} (random weights, NOT trained)"
        synthetic = "synthetic data" if self.card.get("synthetic") else self.card.get("training_data", "")
        text = f"{self.name} (trained on {synthetic})" if synthetic else self.name
        return f"{text}: {self.card['warning']}" if self.card.get("warning") else text


def available_models():
    out = []
    if MODELS_DIR.is_dir():
        for d in sorted(p for p in MODELS_DIR.iterdir() if p.is_dir()):
            unet, e3 = d / "unet.pt", d / "e3cnn.pt"
            if unet.is_file() and e3.is_file():
                card = json.loads((d / "model_card.json").read_text()) if (d / "model_card.json").is_file() else {}
                ref, res, jud = d / "refiner.pt", d / "residual.pt", d / "judge.pt"
                out.append(ModelSpec(d.name, unet, e3, card, ref if ref.is_file() else None,
                                     res if res.is_file() else None, jud if jud.is_file() else None))
    return out


def get_model(name=DEFAULT_NAME):
    for spec in available_models():
        if spec.name == name:
            return spec
    if name == DEFAULT_NAME:
        return ModelSpec("random", None, None, {"warning": RANDOM_WARNING})
    raise KeyError(f"no bundled model named {name!r} (available: {[m.name for m in available_models()]})")


def default_model():
    return get_model(DEFAULT_NAME)


def random_networks(seed=0, unet_config=None, e3cnn_config=None):
    """Deterministic random-weight networks (the placeholder until a trained model ships)."""
    import torch

    from .networks.e3cnn import E3CNN
    from .networks.unet import UNet

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet, e3cnn = UNet(unet_config), E3CNN(e3cnn_config)
    info = {"format": "random", "random_weights": True, "seed": seed, "trained_on": "nothing (random weights)",
            "warning": RANDOM_WARNING}
    return unet.eval(), dict(info, config=unet.config.to_dict()), e3cnn.eval(), dict(info, config=e3cnn.config.to_dict())
