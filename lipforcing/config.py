"""Model configuration: one frozen dataclass with named presets (``tiny``, ``1.3b``, ``14b``).

Field names follow Wan2.1 (``dim``, ``ffn_dim``, ``num_heads``, ``num_layers``, ``in_dim``, ``out_dim``, ...) so a
Wan ``config.json`` maps onto them directly.  Frame counts of the causal student (``chunk_frames``,
``window_frames``, ``sink_frames``) are in *latent frames*; the attention ops take tokens
(frames * tokens per frame, which depends on the latent size and is known only at run time).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

AUDIO_INJECTIONS = ("add", "cross_attn")
ROPE_MODES = ("dynamic", "absolute")
VIDEO_FRAMES_PER_LATENT = 4
"""Video frames covered by one latent frame (Wan VAE temporal stride); AudioPack groups this many features."""


@dataclass(frozen=True)
class ModelConfig:
    """Dimensions of the lip-sync DiT (Wan2.1 block + OmniAvatar-style audio) and of the causal student.

    Network
        dim, ffn_dim, num_heads, num_layers : transformer width, FFN width, heads (``head_dim = dim // num_heads``)
            and blocks.
        in_dim : input channels = 16 noisy latent channels + 49 conditioning channels (65).
        out_dim : predicted (velocity) channels (16).
        patch_size : (t, h, w) patch of the patch embedding, (1, 2, 2).
        text_dim : text-embedding width (UMT5-XXL: 4096).  freq_dim : sinusoidal timestep width (256).
        eps : epsilon of the RMS/LayerNorms (1e-6).  rope_theta : RoPE base (1e4).
    Audio
        audio_injection : ``"add"`` (OmniAvatar: per-layer Linear(audio_token_dim -> dim) for the 0-based blocks
            2 .. num_layers // 2, added to every token of the matching latent frame) or ``"cross_attn"`` (every block
            attends from each latent frame's tokens to that frame's audio tokens, fused with the text
            cross-attention by ``lipforcing.ops.audio_cross_attention``).
        audio_dim : audio feature size per *video* frame (wav2vec2-base, 14 hidden states: 10752).
        audio_token_dim : width of the AudioPack tokens (32).
        audio_window : audio tokens per latent frame in ``"cross_attn"`` mode (``None``: 4, one per video frame);
            ``"add"`` mode uses exactly one token per latent frame (``None`` or 1).
    Causal student
        chunk_frames : latent frames generated per step (3).
        window_frames : latent frames a chunk attends to, *including itself* (6); ``None`` = all earlier frames.
        sink_frames : leading latent frames that are never evicted (1).
        rope_mode : ``"dynamic"`` (cached keys un-rotated; window-relative time positions at attention time) or
            ``"absolute"`` (keys rotated at their absolute frame index; streaming then equals the full-sequence
            block-causal forward).
    """

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int = 65
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_injection: str = "add"
    audio_dim: int = 10752
    audio_token_dim: int = 32
    audio_window: Optional[int] = None
    chunk_frames: int = 3
    window_frames: Optional[int] = 6
    sink_frames: int = 1
    rope_mode: str = "dynamic"

    def __post_init__(self):
        if isinstance(self.patch_size, list):
            object.__setattr__(self, "patch_size", tuple(self.patch_size))
        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim",
                     "audio_dim", "audio_token_dim", "chunk_frames"):
            _positive_int(name, getattr(self, name))
        _positive_int("sink_frames", self.sink_frames, minimum=0)
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        hd = self.dim // self.num_heads
        if hd % 2:
            raise ValueError(f"head_dim = dim // num_heads must be even for RoPE, got {hd} "
                             f"(dim {self.dim}, num_heads {self.num_heads})")
        if hd // 2 < 3:
            raise ValueError(f"head_dim must be >= 6 for the 3-D RoPE split, got {hd}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if (not isinstance(self.patch_size, tuple) or len(self.patch_size) != 3
                or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in self.patch_size)):
            raise ValueError(f"patch_size must be a tuple of 3 positive ints (t, h, w), got {self.patch_size!r}")
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size[0] (temporal patch) must be 1: one token row per latent frame is what the "
                             f"chunked attention and per-frame conditioning assume; got {self.patch_size}")
        if self.in_dim < self.out_dim:
            raise ValueError(f"in_dim ({self.in_dim}) must be >= out_dim ({self.out_dim}): the input holds the "
                             f"{self.out_dim} noisy channels plus the conditioning channels")
        if not (isinstance(self.eps, (int, float)) and self.eps > 0):
            raise ValueError(f"eps must be a positive float, got {self.eps!r}")
        if self.audio_injection not in AUDIO_INJECTIONS:
            raise ValueError(f"audio_injection must be one of {AUDIO_INJECTIONS}, got {self.audio_injection!r}")
        if self.audio_window is not None:
            _positive_int("audio_window", self.audio_window)
            if self.audio_injection == "add" and self.audio_window != 1:
                raise ValueError(f"audio_injection='add' uses one audio token per latent frame, so audio_window "
                                 f"must be None or 1, got {self.audio_window}")
            if self.audio_window > 64:
                raise ValueError(f"audio_window must be <= 64 tokens per latent frame, got {self.audio_window}")
        if self.window_frames is not None:
            _positive_int("window_frames", self.window_frames)
            if self.window_frames < self.chunk_frames:
                raise ValueError(f"window_frames ({self.window_frames}) must be >= chunk_frames "
                                 f"({self.chunk_frames}): the window includes the current chunk")
        if self.rope_mode not in ROPE_MODES:
            raise ValueError(f"rope_mode must be one of {ROPE_MODES}, got {self.rope_mode!r}")

    # ------------------------------------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def audio_tokens_per_frame(self) -> int:
        """Audio tokens per latent frame: 1 in ``"add"`` mode, ``audio_window`` (default 4) in ``"cross_attn"``."""
        if self.audio_injection == "add":
            return 1
        return 4 if self.audio_window is None else self.audio_window

    @property
    def audio_layers(self) -> tuple[int, ...]:
        """0-based blocks that receive an additive audio projection in ``"add"`` mode: 2 .. num_layers // 2."""
        if self.audio_injection != "add":
            return ()
        return tuple(range(2, self.num_layers // 2 + 1))

    @property
    def patch_numel(self) -> int:
        t, h, w = self.patch_size
        return t * h * w

    def replace(self, **changes) -> "ModelConfig":
        """A copy with ``changes`` applied (``dataclasses.replace``; validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **changes) -> "ModelConfig":
        """A named preset (``"tiny"``, ``"1.3b"``, ``"14b"``), optionally with fields replaced."""
        key = str(name).lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[key]
        return cfg.replace(**changes) if changes else cfg


def _positive_int(name: str, v, *, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"ModelConfig.{name} must be an int, got {type(v).__name__} ({v!r})")
    if v < minimum:
        raise ValueError(f"ModelConfig.{name} must be >= {minimum}, got {v}")


PRESETS: dict[str, ModelConfig] = {
    # Wan2.1-T2V-1.3B backbone (+ 65 input channels, OmniAvatar audio modules)
    "1.3b": ModelConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Wan2.1-T2V-14B backbone
    "14b": ModelConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tests: 4 layers so "add" mode has exactly one audio projection (block 2)
    "tiny": ModelConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=4, text_dim=32, audio_dim=16),
}
