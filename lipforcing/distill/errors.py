"""The training code's own error type (the ``lipforcing train`` command prints it as one line, exit 2)."""
from __future__ import annotations

__all__ = ["TrainConfigError"]


class TrainConfigError(ValueError):
    """A training configuration, data set or checkpoint that cannot be used (bad value, unreadable file, ...)."""
