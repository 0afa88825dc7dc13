"""Public ops of lipforcing.  Layout of every attention tensor: (batch, seqlen, heads, head_dim).

Each op validates its inputs once, then dispatches to ``backend="auto" | "cuda" | "triton" | "reference"``
(``LIPFORCING_BACKEND`` replaces ``"auto"``); see ``lipforcing.ops._dispatch``.  Every op is registered with
``torch.library`` as ``torch.ops.lipforcing.<op>``.
"""
from lipforcing.ops._dispatch import BACKENDS, BackendUnavailable
from lipforcing.ops.audio_cross_attention import audio_cross_attention
from lipforcing.ops.block_causal_attention import block_causal_attention
from lipforcing.ops.chunk_attention import chunk_attention
from lipforcing.ops.denoise_update import denoise_update
from lipforcing.ops.qk_norm import qk_norm
from lipforcing.ops.rope import RopeSpec, rope_spec

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "RopeSpec",
    "audio_cross_attention",
    "block_causal_attention",
    "chunk_attention",
    "denoise_update",
    "qk_norm",
    "rope_spec",
]
