"""``lipforcing train --stage teacher``: flow-matching training of the bidirectional DiT (the teacher, also the
DMD critic's initialisation) on precomputed latent clips.

Per sample: t = shift(u), u ~ U(0, 1) (shift 5, as the teacher's sampler), x_t = (1 - t) x0 + t eps, target
velocity v = eps - x0, loss = weighted MSE(v_pred, v) with weight ``mouth_weight`` on the latent cells of the mouth
mask (the mask channel of the conditioning; the paper's teacher weights the mouth 2x) and 1 elsewhere.  Condition
dropout for classifier-free guidance: with probability ``text_dropout`` the prompt becomes the negative prompt
(``neg_text``), with ``audio_dropout`` the audio becomes zeros (the CFG negative of the sampler is both at once,
drawn with ``joint_dropout``).  Sample with :func:`lipforcing.model.teacher.sample` (50 shifted Euler steps, CFG).

Every ``probe_every`` iterations, :meth:`TeacherStage.audio_probe` measures how much the model uses the audio
(velocity MSE with the true audio vs zero audio on fixed samples): the metric to compare audio paths (``"add"`` vs
``"cross_attn"``, depth) at tiny scale.

Output: ``teacher.safetensors`` in each checkpoint (Wan-native names, the model config in the metadata; the
``teacher_path`` of the df/sf stages takes the run folder).  Metrics: ``loss`` (weighted), ``mse``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from lipforcing import schedule
from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages.base import Stage, StageConfig, check_int, check_positive_number

__all__ = ["TeacherStageConfig", "TeacherStage", "flow_matching_loss"]


@dataclass
class TeacherStageConfig(StageConfig):
    stage: str = "teacher"
    lr: float = 1e-4
    weight_decay: float = 0.01
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    data: dict = field(default_factory=lambda: {"kind": "synthetic"})
    text_dropout: float = 0.1
    audio_dropout: float = 0.1
    joint_dropout: float = 0.1
    mouth_weight: float = 2.0
    shift: float = schedule.SHIFT
    init: str | None = None
    probe_every: int = 50
    output_dir: str = "runs/teacher"

    def __post_init__(self):
        super().__post_init__()
        for name in ("text_dropout", "audio_dropout", "joint_dropout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise TrainConfigError(f"{name} must be a probability in [0, 1], got {v!r}")
        check_positive_number("mouth_weight", self.mouth_weight)
        check_positive_number("shift", self.shift)
        check_int("probe_every", self.probe_every, minimum=0)
        self.model_config()
        self.data_config()

    def model_config(self):
        from lipforcing.config import ModelConfig

        if not isinstance(self.model_overrides, dict):
            raise TrainConfigError(f"model_overrides must be a mapping, got {type(self.model_overrides).__name__}")
        try:
            return ModelConfig.from_name(self.model, **self.model_overrides)
        except (TypeError, ValueError) as exc:
            raise TrainConfigError(f"model {self.model!r}: {exc}") from None

    def data_config(self):
        from lipforcing.distill.trainer import DataConfig

        from lipforcing.distill.stages.base import config_from_dict

        return config_from_dict(DataConfig, dict(self.data), "data") if isinstance(self.data, dict) else \
            _bad_data(self.data)


def _bad_data(d):
    raise TrainConfigError(f"data must be a mapping, got {type(d).__name__}")


def flow_matching_loss(model, x0: torch.Tensor, cond, t: torch.Tensor, eps: torch.Tensor, *,
                       mouth_weight: float = 1.0, mouth_channel: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample weighted MSE of the velocity and the plain MSE: ((B,), (B,)).

    x0, eps (B, 16, F, H, W); t (B,) in [0, 1]; ``cond.y[:, mouth_channel]`` is the mouth mask (1 = generate)."""
    x_t = schedule.add_noise(x0, eps, t)
    v = model(cond.model_input(x_t), schedule.timestep_input(t), cond.context, cond.audio).float()
    err = (v - schedule.velocity(x0, eps)) ** 2
    mask = cond.y[:, mouth_channel:mouth_channel + 1].float()
    w = 1.0 + (mouth_weight - 1.0) * mask
    weighted = (err * w).flatten(1).sum(1) / (w.expand_as(err).flatten(1).sum(1))
    return weighted, err.flatten(1).mean(1)


class TeacherStage(Stage):
    name = "teacher"
    Config = TeacherStageConfig

    def build(self) -> None:
        from lipforcing.distill.trainer import build_dataset
        from lipforcing.model import build_model, load_model

        c = self.cfg
        mcfg = c.model_config()
        self.dataset = build_dataset(c.data_config(), mcfg, seed=c.seed)
        if c.init:
            self.model = load_model(c.init, config=mcfg, causal=False, device=self.device)
        else:
            self.model = build_model(mcfg, causal=False, device=self.device)
        self.model.train()
        self.models = {"teacher": (self.model, self.optimizer(self.model))}

    def step(self, k: int) -> dict:
        from lipforcing.distill.data import batch_condition, collate
        from lipforcing.model.teacher import Condition

        c = self.cfg
        B = c.batch_size
        idx = torch.randint(len(self.dataset), (B,), generator=self.generator(k, "data"))
        batch = collate([self.dataset[int(i)] for i in idx])
        x0, cond = batch_condition(batch, self.device)
        g = self.generator(k, "noise")
        u = torch.rand(B, generator=g, dtype=torch.float64)
        t = schedule.shift_time(u, c.shift).float().clamp(1e-3, 0.999).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        drop = torch.rand(B, 3, generator=g)
        joint = drop[:, 2] < c.joint_dropout
        drop_text = ((drop[:, 0] < c.text_dropout) | joint).to(self.device)
        drop_audio = ((drop[:, 1] < c.audio_dropout) | joint).to(self.device)
        ctx = torch.where(drop_text[:, None, None], cond.negative_context(), cond.context)
        audio = cond.audio
        if audio is not None:
            audio = torch.where(drop_audio.view(-1, *([1] * (audio.dim() - 1))), torch.zeros_like(audio), audio)
        cond = Condition(y=cond.y, context=ctx, audio=audio, neg_context=cond.neg_context)
        weighted, mse = flow_matching_loss(self.model, x0, cond, t, eps, mouth_weight=c.mouth_weight)
        loss = weighted.mean()
        gnorm = self.clip_and_step("teacher", loss)
        m = {"loss": loss.item(), "mse": float(mse.detach().mean()), "grad_norm": gnorm, "t_mean": float(t.mean())}
        if c.probe_every and k % c.probe_every == 0:
            m.update(self.audio_probe())
        return m

    @torch.no_grad()
    def audio_probe(self, samples: int = 4) -> dict:
        """How much the model uses the audio: the velocity MSE on fixed samples (fixed t, noise) with the true
        audio and with zero audio; ``audio_gain`` = the difference (> 0: the audio helps)."""
        from lipforcing.distill.data import batch_condition, collate
        from lipforcing.model.teacher import Condition

        n = min(samples, len(self.dataset))
        x0, cond = batch_condition(collate([self.dataset[i] for i in range(n)]), self.device)
        if cond.audio is None:
            return {}
        g = self.generator("probe")
        t = torch.linspace(0.3, 0.9, n).to(self.device)
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        self.model.eval()
        with_audio = flow_matching_loss(self.model, x0, cond, t, eps)[1].mean()
        silent = Condition(y=cond.y, context=cond.context, audio=torch.zeros_like(cond.audio))
        without = flow_matching_loss(self.model, x0, silent, t, eps)[1].mean()
        self.model.train()
        return {"probe_mse": float(with_audio), "probe_mse_no_audio": float(without),
                "audio_gain": float(without - with_audio)}

    def weight_metadata(self, name: str) -> dict:
        from lipforcing.model.loading import CONFIG_METADATA_KEY

        return {CONFIG_METADATA_KEY: json.dumps(self.model.config.to_dict()), "causal": "False", "stage": "teacher"}
