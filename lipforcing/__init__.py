"""lipforcing: real-time streaming video-to-video lip sync with a few-step autoregressive diffusion model.

``lipforcing.ops`` holds the kernels' public ops; ``RollingKVCache`` the per-layer streaming cache.  The model,
VAE and streaming engine are imported on first use.
"""
from __future__ import annotations

from lipforcing._lazy import lazy_attributes

__version__ = "0.1.0"

# name -> module that defines it (imported lazily so `import lipforcing` stays light)
_LAZY = {
    "RollingKVCache": "lipforcing.cache",   # lazy too: `lipforcing --help` never imports torch
    "ops": "lipforcing.ops",
    "ModelConfig": "lipforcing.config",
    "build_model": "lipforcing.model",
    "load_model": "lipforcing.model",
    "load_vae": "lipforcing.vae",
    "load_decoder": "lipforcing.decoders",
    "Engine": "lipforcing.engine",
    "Session": "lipforcing.engine",
    "Frame": "lipforcing.engine",
    "schedule": "lipforcing.schedule",
    "distill": "lipforcing.distill",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_attributes(globals(), _LAZY)
