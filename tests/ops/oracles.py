"""Independent dense oracles for the op tests, written from the rules in DESIGN.md section 4 (loops over
chunks and frames; no code shared with lipforcing.ops.reference)."""
import math

import torch


def dense_block_causal(q, k, v, chunk_size, window, sink, scale=None):
    """float64 attention where each chunk's queries see the key set of the DESIGN rule, built chunk by chunk."""
    B, L, H, D = q.shape
    scale = scale if scale is not None else 1 / math.sqrt(D)
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty_like(q)
    for start in range(0, L, chunk_size):
        end_nominal = start + chunk_size
        stop = min(end_nominal, L)
        keys = [j for j in range(min(end_nominal, L))
                if window is None or j < sink or j >= end_nominal - window]
        idx = torch.tensor(keys)
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, start:stop], k[:, idx]) * scale
        p = torch.softmax(s, dim=-1)
        out[:, start:stop] = torch.einsum("bhqk,bkhd->bqhd", p, v[:, idx])
    return out


def dense_audio_cross(q, text_k, text_v, audio_k, audio_v, tokens_per_frame, audio_scale, scale=None):
    B, L, H, D = q.shape
    scale = scale if scale is not None else 1 / math.sqrt(D)
    out = torch.zeros(B, L, H, D, dtype=torch.float64)
    for f in range(L // tokens_per_frame):
        sl = slice(f * tokens_per_frame, (f + 1) * tokens_per_frame)
        qf = q[:, sl].double()
        if text_k.shape[1]:
            p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qf, text_k.double()) * scale, -1)
            out[:, sl] += torch.einsum("bhqk,bkhd->bqhd", p, text_v.double())
        p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qf, audio_k[:, f].double()) * scale, -1)
        out[:, sl] += audio_scale * torch.einsum("bhqk,bkhd->bqhd", p, audio_v[:, f].double())
    return out
