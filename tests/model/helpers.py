"""Shared helpers of the model tests (tiny preset, CPU, float32)."""
import torch

from lipforcing.config import ModelConfig
from lipforcing.model import build_model, group_audio_frames


def make_inputs(cfg: ModelConfig, batch=2, frames=5, height=2, width=4, text_len=5, per_frame_t=True):
    """Fresh random inputs: x (B, in_dim, F, H, W), t, context, audio (B, F, 4, audio_dim)."""
    x = torch.randn(batch, cfg.in_dim, frames, height, width)
    t = torch.rand(batch, frames) * 1000 if per_frame_t else torch.rand(batch) * 1000
    ctx = torch.randn(batch, text_len, cfg.text_dim)
    audio = group_audio_frames(torch.randn(batch, 1 + 4 * (frames - 1), cfg.audio_dim))
    return x, t, ctx, audio


def student_and_teacher(cfg):
    student = build_model(cfg, causal=True)
    teacher = build_model(cfg, causal=False)
    teacher.load_state_dict(student.state_dict())
    return student.eval(), teacher.eval()
