"""The lip-sync DiT (Wan2.1 backbone + OmniAvatar audio) and its full-sequence forward.

``LipSyncDiT(config, causal=False)`` is the bidirectional teacher / critic; the causal student
(:class:`lipforcing.model.student.CausalLipSyncDiT`) subclasses it and only changes the attention mask of the
full-sequence forward and adds the streaming API.  Parameter names are Wan2.1's (plus OmniAvatar's ``audio_proj``
and ``audio_cond_projs``) so checkpoints load without renaming.
"""
from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.utils.checkpoint

from lipforcing import ops
from lipforcing.config import VIDEO_FRAMES_PER_LATENT, ModelConfig
from lipforcing.model.audio import AudioPack, check_audio
from lipforcing.model.blocks import Head, WanBlock
from lipforcing.model.layers import (frame_timesteps, linear_f32, patchify, sinusoidal_embedding, unpatchify,
                                     xavier_linear_)
from lipforcing.ops.rope import RopeSpec, apply_rope, rope_spec

MIN_ROPE_FRAMES = 1024  # Wan's table length


class LipSyncDiT(nn.Module):
    """Wan2.1 DiT with 65 input channels and audio conditioning; predicts the flow velocity.

    Attributes
    ----------
    config : ModelConfig
    causal : bool -- False here (bidirectional attention over the whole clip).
    attn_backend : str -- the ``backend=`` passed to every ``lipforcing.ops`` call (default ``"auto"``).
    gradient_checkpointing : bool -- recompute each block in the backward pass (training only).
    """

    causal = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a lipforcing.ModelConfig, got {type(config).__name__}")
        self.config = config
        self.attn_backend = "auto"
        self.gradient_checkpointing = False
        c = config
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(WanBlock(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.audio_proj = AudioPack(c)
        if c.audio_injection == "add":
            # OmniAvatar: audio_cond_projs[i - 2] is added before 0-based block i, for i in 2 .. num_layers // 2
            self.audio_cond_projs = nn.ModuleList(nn.Linear(c.audio_token_dim, c.dim) for _ in c.audio_layers)
        self._rope_tables: dict = {}

    # ------------------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every parameter in place (works after ``to_empty``; uses the global RNG)."""
        xavier_linear_(_conv_as_linear(self.patch_embedding))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.normal_(m.bias, std=0.02)
        xavier_linear_(self.time_projection[1])
        for block in self.blocks:
            block.reset_parameters()
        self.head.reset_parameters()
        self.audio_proj.reset_parameters()
        for p in getattr(self, "audio_cond_projs", ()):
            xavier_linear_(p)

    def compile_blocks(self, **compile_kwargs) -> "LipSyncDiT":
        """``torch.compile`` the dense parts of every block (``pre_attention``, ``mid``, ``post``: norms,
        modulation, projections, FFN) while the attention ops stay eager custom-op calls.  One compiled function
        per part is shared by all blocks (parameters are graph inputs), so 40 blocks do not mean 40 graphs and
        the streaming state (caches, frame counter) never reaches dynamo.  Returns self."""
        for name in ("pre_attention", "mid", "post"):
            fn = torch.compile(getattr(WanBlock, name), **compile_kwargs)
            for block in self.blocks:
                setattr(block, name, types.MethodType(fn, block))
        return self

    # ------------------------------------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _check_x(self, x: torch.Tensor, name: str = "x") -> tuple[int, int, int, int]:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a (batch, in_dim={c.in_dim}, frames, height, width) tensor, got {shape}")
        B, C, Fr, H, W = x.shape
        if C != c.in_dim:
            raise ValueError(f"{name} must have in_dim={c.in_dim} channels (16 noisy + {c.in_dim - c.out_dim} "
                             f"conditioning), got {C} (shape {tuple(x.shape)})")
        _, ph, pw = c.patch_size
        if Fr < 1 or H % ph or W % pw or H == 0 or W == 0:
            raise ValueError(f"{name} must have >= 1 frame and height/width divisible by the patch "
                             f"{c.patch_size[1:]}, got shape {tuple(x.shape)}")
        return B, Fr, H // ph, W // pw

    def rope_table(self, grid: tuple[int, int], frames: int, device) -> RopeSpec:
        """Cached Wan 3-D RoPE tables for a latent grid (in tokens) covering at least ``frames`` time positions."""
        rows = max(MIN_ROPE_FRAMES, frames)
        key = (tuple(grid), torch.device(device))
        spec = self._rope_tables.get(key)
        if spec is None or spec.max_positions < rows:
            spec = rope_spec(self.config.head_dim, tuple(grid), max_frames=rows, theta=self.config.rope_theta,
                             device=device)
            self._rope_tables[key] = spec
        return spec

    def embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """Text embedding: (B, Lt, text_dim) -> (B, Lt, dim) in the parameter dtype."""
        c = self.config
        if not isinstance(context, torch.Tensor) or context.dim() != 3 or context.shape[-1] != c.text_dim:
            shape = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must be a (batch, text_len, text_dim={c.text_dim}) tensor, got {shape}")
        return self.text_embedding(context.to(self.dtype))

    def embed_time(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B, F) float32 on the 0..1000 scale -> (e (B, F, dim), e0 (B, F, 6, dim)), both float32."""
        e = linear_f32(sinusoidal_embedding(t, self.config.freq_dim), self.time_embedding[0])
        e = linear_f32(torch.nn.functional.silu(e), self.time_embedding[2])
        e0 = linear_f32(torch.nn.functional.silu(e), self.time_projection[1])
        return e, e0.unflatten(-1, (6, self.config.dim))

    def audio_tokens(self, audio: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor | None:
        """audio (B, F, 4, audio_dim) or None -> AudioPack tokens (B, F, A, audio_token_dim) or None."""
        if audio is None:
            return None
        check_audio(audio, batch, frames, self.config.audio_dim)
        return self.audio_proj(audio)

    def run_blocks(self, x: torch.Tensor, e0: torch.Tensor, attend_for, text_kvs, audio_tok, *,
                   tokens_per_frame: int, audio_scale: float, side_effects: bool = False) -> torch.Tensor:
        """Run every block.  ``attend_for(i)`` gives block i's attention function; ``text_kvs`` is either the
        embedded text (B, Lt, dim) (K/V computed per block) or a list of precomputed (k, v) per block.
        ``side_effects=True`` (the attention writes a cache) disables gradient checkpointing, whose recomputation
        would run the attention twice."""
        audio_add = getattr(self, "audio_cond_projs", None)
        first_audio = self.config.audio_layers[0] if self.config.audio_layers else None
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not side_effects
        for i, block in enumerate(self.blocks):
            if audio_tok is not None and audio_add is not None and i in self.config.audio_layers:
                a = audio_add[i - first_audio](audio_tok[:, :, 0]).float()  # (B, F, dim)
                B, L, D = x.shape
                Fr = a.shape[1]
                x = (x.view(B, Fr, L // Fr, D) + a[:, :, None]).view(B, L, D)
            if isinstance(text_kvs, torch.Tensor):
                text_kv = block.text_kv(text_kvs)
            else:
                text_kv = text_kvs[i]
            audio_kv = None
            if audio_tok is not None and block.cross_attn.has_audio:
                audio_kv = block.audio_kv(audio_tok)
            kwargs = dict(tokens_per_frame=tokens_per_frame, audio_scale=audio_scale, backend=self.attn_backend)
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(block, x, e0, attend_for(i), text_kv, audio_kv,
                                                      use_reentrant=False, **kwargs)
            else:
                x = block(x, e0, attend_for(i), text_kv, audio_kv, **kwargs)
        return x

    def output(self, x: torch.Tensor, e: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        c = self.config
        out = self.head(x, e)
        return unpatchify(out, grid, c.patch_size, c.out_dim)

    # ------------------------------------------------------------------------------------------------ attention
    def full_attention_args(self, frames: int, tokens_per_frame: int, attention=None) -> tuple[int, int | None, int]:
        """(chunk_size, window, sink) in tokens for the full-sequence forward.  Bidirectional: one chunk."""
        if attention is not None:
            raise ValueError("attention= (window, sink) overrides apply to the causal student only; the "
                             "bidirectional model attends over the whole clip")
        return frames * tokens_per_frame, None, 0

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, timestep, context: torch.Tensor, audio: torch.Tensor | None = None, *,
                attention=None, audio_scale: float = 1.0) -> torch.Tensor:
        """Full-sequence forward: the flow velocity of every latent frame.

        Parameters
        ----------
        x : (B, in_dim, F, H, W) -- noisy latents (16 channels) concatenated with the conditioning channels; any
            float dtype (cast to the parameter dtype).
        timestep : (B,) or per latent frame (B, F) (or a number), on Wan's 0..1000 scale (``1000 * t``).
        context : (B, Lt, text_dim) text embedding (UMT5; Wan pads it to 512 tokens with zeros).
        audio : (B, F, 4, audio_dim) -- per latent frame the features of the 4 video frames it covers
            (:func:`lipforcing.model.audio.group_audio_frames`); ``None`` skips the audio branch entirely (which
            is *not* the CFG negative: that is zero features, see ``teacher.cfg_velocity``).
        attention : causal student only -- ``(window_frames, sink_frames)`` overriding the config for this call
            (diffusion-forcing training draws them at random); ``window_frames=None`` = all earlier frames.
        audio_scale : weight of the audio branch in ``"cross_attn"`` mode.

        Returns
        -------
        velocity : (B, out_dim=16, F, H, W) float32.

        RoPE uses absolute frame positions 0 .. F-1 (the student's full-sequence mode always does; dynamic RoPE
        is a streaming feature).
        """
        B, Fr, gh, gw = self._check_x(x)
        tpf = gh * gw
        t = frame_timesteps(timestep, B, Fr, x.device)
        e, e0 = self.embed_time(t)
        ctx = self.embed_text(context)
        if ctx.shape[0] != B:
            raise ValueError(f"context has batch {ctx.shape[0]} but x has batch {B}")
        audio_tok = self.audio_tokens(audio, B, Fr)
        tokens = patchify(x, self.patch_embedding.weight, self.patch_embedding.bias, self.config.patch_size).float()

        chunk, window, sink = self.full_attention_args(Fr, tpf, attention)
        spec = self.rope_table((gh, gw), Fr, x.device)
        t_pos = torch.arange(Fr, device=x.device).repeat_interleave(tpf)
        backend = self.attn_backend

        def attend(q, k, v):
            q = apply_rope(q, t_pos, spec).to(v.dtype)
            k = apply_rope(k, t_pos, spec).to(v.dtype)
            return ops.block_causal_attention(q, k, v, chunk_size=chunk, window=window, sink=sink, backend=backend)

        h = self.run_blocks(tokens, e0, lambda i: attend, ctx, audio_tok, tokens_per_frame=tpf,
                            audio_scale=audio_scale)
        return self.output(h, e, (Fr, gh, gw))

    def extra_repr(self) -> str:
        c = self.config
        return (f"dim={c.dim}, layers={c.num_layers}, heads={c.num_heads}, audio={c.audio_injection!r}, "
                f"causal={self.causal}")


def _conv_as_linear(conv: nn.Conv3d) -> nn.Linear:
    """A Linear view of a Conv3d's parameters (shared storage) for initialisation."""
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features = conv.weight[0].numel()
    lin.out_features = conv.weight.shape[0]
    lin.weight = nn.Parameter(conv.weight.data.view(lin.out_features, lin.in_features), requires_grad=False)
    lin.bias = nn.Parameter(conv.bias.data, requires_grad=False)
    return lin


# video frames per latent frame: re-exported for callers that build audio windows
__all__ = ["LipSyncDiT", "VIDEO_FRAMES_PER_LATENT"]
