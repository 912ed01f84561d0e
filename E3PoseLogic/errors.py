"""Errors a user can act on: each names the file (or input) and the problem."""


class E3PoseError(Exception):
    """Base class of E3Pose errors that carry a user-facing message."""


class InputError(E3PoseError):
    """A bad input volume or mask: unreadable, 4D, non-finite, empty, sheared, mask empty or on the border."""

    def __init__(self, source, reason):
        self.source = str(source) if source is not None else "<array>"
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


class NoBrainFound(InputError):
    """The brain mask is empty or too small to trust (the pipeline may retry on a finer grid first)."""


class MaskAtBorder(InputError):
    """The brain mask reaches the edge of the field of view (the pipeline retries the other grids first: on a
    small head the model's grid can leak into the surroundings where a finer one does not)."""


class CheckpointError(E3PoseError):
    """A weights file that cannot be read or does not match the expected network."""

    def __init__(self, path, reason):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
