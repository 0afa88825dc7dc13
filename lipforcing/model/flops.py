"""FLOP count of one DiT pass (matmuls only, 2 FLOPs per multiply-add), for benchmarks and the profiler."""
from __future__ import annotations

from lipforcing.config import ModelConfig


def pass_flops(config: ModelConfig, *, tokens_per_frame: int = 1024, query_frames: int = 3,
               key_frames: int | None = None, text_len: int = 512, text_kv: bool = False,
               audio: bool = True) -> float:
    """FLOPs of one forward pass over ``query_frames`` latent frames.

    key_frames : frames each query attends to (default: sink + window of the config, i.e. the student's
        steady-state chunk: 1 + 6 = 7; for a bidirectional pass over the clip pass ``query_frames``).
    text_kv : count the text embedding and the text K/V projections (a streaming student computes them once per
        session, not per pass; a full-sequence forward computes them every time).
    audio : count the audio modules (AudioPack and the additive projections / audio K/V).

    At 512x512 (1024 tokens per frame), 3-frame chunks, 7 key frames and 512 text tokens this is about 12.0
    TFLOP for the 1.3B preset and 92.8 TFLOP for the 14B preset.
    """
    c = config
    if key_frames is None:
        key_frames = (c.sink_frames + c.window_frames) if c.window_frames is not None else query_frames
    lq = query_frames * tokens_per_frame
    lk = key_frames * tokens_per_frame
    d, f = c.dim, c.ffn_dim
    per_block = (2 * lq * d * 3 * d           # self-attention q, k, v
                 + 4 * lq * lk * d            # QK^T and PV over all heads
                 + 2 * lq * d * d             # self-attention o
                 + 2 * lq * d * d * 2         # cross-attention q, o
                 + 4 * lq * text_len * d      # cross-attention over the text
                 + 2 * lq * d * f * 2)        # FFN
    if text_kv:
        per_block += 2 * text_len * d * d * 2
    total = c.num_layers * per_block
    if text_kv:
        total += 2 * text_len * (c.text_dim * d + d * d)  # text embedding
    total += 2 * lq * c.in_dim * c.patch_numel * d                  # patch embedding
    total += 2 * lq * d * c.patch_numel * c.out_dim                  # head
    total += query_frames * 2 * (c.freq_dim * d + d * d + 6 * d * d)  # time embedding / projection per frame
    if audio:
        a = c.audio_tokens_per_frame
        total += query_frames * 2 * 4 * c.audio_dim * a * c.audio_token_dim
        if c.audio_injection == "add":
            total += len(c.audio_layers) * query_frames * 2 * c.audio_token_dim * d
        else:
            total += c.num_layers * (query_frames * a * 2 * c.audio_token_dim * d * 2 + 4 * lq * a * d)
    return float(total)
