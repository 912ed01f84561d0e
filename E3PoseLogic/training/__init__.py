"""Training of the two networks (``e3pose train-unet`` / ``e3pose train-e3cnn``).

Imported only lazily by ``cli/train.py``: modules here may import torch at the top. Every training volume goes
through exactly the inference preprocessing (``preprocess.unet_input``, ``crop.crop_for_e3cnn``), so what the
networks see in training and at inference is built by the same code.
"""
