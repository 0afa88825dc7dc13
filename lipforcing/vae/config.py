"""VAE configuration: a frozen dataclass with named presets (``wan2.1``, ``tiny``).

Field names follow the official Wan2.1 VAE constructor (``dim``, ``z_dim``, ``dim_mult``, ``num_res_blocks``,
``attn_scales``); ``temporal_downsample`` is Wan's ``temperal_downsample`` spelled correctly (``from_dict`` accepts
both spellings, and diffusers' ``base_dim``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

# Per-channel statistics of Wan2.1 VAE latents (the official ``WanVAE`` wrapper and diffusers' config carry the same
# 16 + 16 numbers).  The DiT sees ``(mu - mean) / std``.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


@dataclass(frozen=True)
class VAEConfig:
    """Dimensions of a Wan2.1-style causal 3-D VAE.

    dim : base channel width (Wan2.1: 96).  Encoder stage widths are ``dim * [1] + dim_mult``.
    z_dim : latent channels (16).  The encoder head emits ``2 * z_dim`` (mean and log-variance).
    dim_mult : width multipliers of the stages; ``len(dim_mult) - 1`` spatial 2x resamplings (Wan2.1: 8x).
    num_res_blocks : residual blocks per encoder stage (the decoder has one more per stage).
    attn_scales : spatial scales (1.0, 0.5, ...) that get an attention block after each residual block
        (Wan2.1: none; the middle blocks always have one).
    temporal_downsample : per resampling, whether it also halves time (Wan2.1: ``(False, True, True)``, 4x).
        The decoder upsamples time in the mirrored order.
    latents_mean, latents_std : per-channel latent statistics used by ``normalize=True`` (``None``: Wan2.1's
        constants when ``z_dim == 16``, else mean 0 / std 1).
    dropout : dropout of the residual blocks (0 for inference).
    """

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # None statistics: Wan2.1's for a 16-channel latent, identity (mean 0, std 1) otherwise
        if self.latents_mean is None:
            z = self.z_dim if isinstance(self.z_dim, int) else 0
            object.__setattr__(self, "latents_mean", WAN21_LATENTS_MEAN if z == 16 else (0.0,) * z)
        if self.latents_std is None:
            z = self.z_dim if isinstance(self.z_dim, int) else 0
            object.__setattr__(self, "latents_std", WAN21_LATENTS_STD if z == 16 else (1.0,) * z)
        # normalise list inputs to tuples so the dataclass stays hashable and comparable
        for name in ("dim_mult", "attn_scales", "temporal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in ("latents_mean", "latents_std", "attn_scales"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("dim", "z_dim", "num_res_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"VAEConfig.{name} must be a positive int, got {v!r}")
        if len(self.dim_mult) < 1 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                         for m in self.dim_mult):
            raise ValueError(f"VAEConfig.dim_mult must be a non-empty sequence of positive ints, got {self.dim_mult}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"VAEConfig.temporal_downsample needs one flag per resampling (len(dim_mult) - 1 = "
                             f"{len(self.dim_mult) - 1}), got {self.temporal_downsample}")
        object.__setattr__(self, "temporal_downsample", tuple(bool(b) for b in self.temporal_downsample))
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"VAEConfig.{name} must have z_dim ({self.z_dim}) entries, "
                                 f"got {len(getattr(self, name))}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.latents_std):
            raise ValueError(f"VAEConfig.latents_std must be positive and finite, got {self.latents_std}")
        if self.dim * min(self.dim_mult) < 2:
            raise ValueError("VAEConfig: every stage needs at least 2 channels (the decoder halves widths)")

    # ----------------------------------------------------------------------------------------------- derived sizes
    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along height and width (Wan2.1: 8)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame after the first (Wan2.1: 4): ``1 + f * k`` frames -> ``1 + k`` latents."""
        return 2 ** sum(self.temporal_downsample)

    # --------------------------------------------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, name: str) -> "VAEConfig":
        """``"wan2.1"`` (the released VAE, also ``"wan"``/``"default"``) or ``"tiny"`` (CPU tests)."""
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        key = name.lower().replace("_", "").replace("-", "")
        if key in ("wan2.1", "wan21", "wan", "default"):
            return cls()
        if key == "tiny":
            # 8x / 4x like Wan2.1, 16 latent channels (so the DiT's 16-channel contract holds), narrow and shallow
            return cls(dim=8, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1)
        raise ValueError(f"unknown VAE preset {name!r}; expected one of 'wan2.1', 'tiny'")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Build from an official-style or diffusers-style dict (``base_dim``/``temperal_downsample`` accepted).

        Keys that do not change the network (``_class_name``, ``scale_factor_*``, ...) are ignored; diffusers
        options this implementation does not support (Wan2.2's ``is_residual``, ``patch_size``, a separate
        ``decoder_base_dim``, other than 3 image channels) raise ValueError.
        """
        d = dict(d)
        unsupported = []
        if d.get("is_residual"):
            unsupported.append("is_residual=True (the Wan2.2 VAE)")
        if d.get("patch_size") not in (None, 1):
            unsupported.append(f"patch_size={d.get('patch_size')}")
        base = d.get("base_dim", d.get("dim"))
        if d.get("decoder_base_dim") not in (None, base):
            unsupported.append(f"decoder_base_dim={d.get('decoder_base_dim')} != base_dim={base}")
        for k in ("in_channels", "out_channels"):
            if d.get(k, 3) != 3:
                unsupported.append(f"{k}={d.get(k)}")
        if unsupported:
            raise ValueError("unsupported VAE config: " + ", ".join(unsupported))
        kw: dict[str, Any] = {}
        if base is not None:
            kw["dim"] = base
        for k in ("z_dim", "dim_mult", "num_res_blocks", "attn_scales", "dropout"):
            if k in d and d[k] is not None:
                kw[k] = d[k]
        td = d.get("temporal_downsample", d.get("temperal_downsample"))
        if td is not None:
            kw["temporal_downsample"] = td
        for k in ("latents_mean", "latents_std"):
            if d.get(k) is not None:
                kw[k] = d[k]
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "VAEConfig":
        return dataclasses.replace(self, **changes)
