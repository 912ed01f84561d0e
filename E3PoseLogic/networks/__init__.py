"""The two networks of E(3)-Pose: a segmentation U-Net (translation) and an E(3)-equivariant CNN (rotation).

Module and parameter names follow the published checkpoints key for key, so published state dicts load as they are.
"""
