"""The distillation trainer: one loop for stage 1 (diffusion forcing, ``df``) and stage 2 (Self-Forcing with
Sync-Window DMD and the SyncNet reward, ``sf``).

Run it with ``lipforcing train --stage df|sf --config run.yaml`` (single process: CPU or one GPU), or under
``torchrun --nproc_per_node N -m lipforcing train ...`` for PyTorch FSDP2 (``fully_shard``; NCCL on GPUs, gloo on
CPUs).  The YAML holds the fields of :class:`TrainConfig` (nested ``data:`` and ``reward:`` sections)::

    model: 1.3b                 # student preset (+ model_overrides: {...})
    teacher_model: 14b          # teacher / critic preset (default: the student's)
    teacher_path: ckpt/omniavatar_ls_14b.safetensors
    student_init: runs/df/      # sf: the stage-1 output (directory or .safetensors)
    data: {kind: files, path: data/latents/}
    batch_size: 1
    iterations: 600
    reward: {enabled: true, syncnet_path: syncnet_v2.model, decoder: vae, vae_path: Wan2.1_VAE.pth}
    precision: bf16
    output_dir: runs/sf

Per iteration k (every random draw is a function of (seed, k, global sample index), so a run resumes exactly
and gives the same result for any number of ranks with the same global batch):

* ``df`` (:mod:`lipforcing.distill.stages.df`): per-chunk t from {0.999, 0.769, 0}, one block-causal pass with a
  random (window, sink), loss 0.5 * MSE(x0_pred, x0); AdamW(betas (0.9, 0.999)), clip 10.
* ``sf`` (:mod:`lipforcing.distill.stages.sf`): Self-Forcing rollout + SW-DMD (+ reward) student updates, 5 critic
  updates per student update; AdamW(betas (0, 0.999)) for both, grad clip 10 on the student.

Learning rates: 1e-5 (df) / 2e-6 (sf) as in the paper for the 1.3B/14B presets; 1e-4 / 2e-5 for ``tiny`` (what
small models on the procedural world need).  This module holds the config, model building, the loop and the
checkpoints shared by both stages; the other stages (vae, syncnet, teacher) are in :mod:`lipforcing.distill.stages`.

Checkpoints are written atomically (:mod:`lipforcing.distill.checkpoint`): every file to a temporary name, fsync,
rename; ``trainer.json`` and then the ``latest`` pointer last.  A resume refuses (``TrainConfigError``) a garbage
``trainer.json``, an iteration < 0, truncated files and NaN/inf weights.
Checkpoints (``output_dir/ckpt-<iteration>/``): ``student.safetensors`` (Wan-native names plus the model config in
the metadata: loadable by ``lipforcing.load_model``), ``critic.safetensors`` (sf), ``optim_student.safetensors``,
``optim_critic.safetensors`` and ``trainer.json``; ``output_dir/latest`` names the newest.  Metrics go to the log
and to ``output_dir/metrics.jsonl``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from lipforcing import schedule
from lipforcing.config import ModelConfig
from lipforcing.distill import checkpoint as ckpt
from lipforcing.distill.distributed import dist_info, init_distributed, shard_model  # noqa: F401 (re-exported)
from lipforcing.distill.errors import TrainConfigError
from lipforcing.distill.stages.df import DFSteps
from lipforcing.distill.stages.sf import SFSteps

log = logging.getLogger("lipforcing.train")

STAGES = ("df", "sf")
# (window_frames, sink_frames) in ModelConfig semantics: the window counts the frames a chunk attends to
# *including itself* and *excluding* the sink.  The reference's local_attn_size includes the sink, so its
# (7,1) (10,1) (13,1) (9,3) (12,3) are (6,1) (9,1) (12,1) (6,3) (9,3) here.
DF_ATTENTION_CONFIGS = ((6, 1), (9, 1), (12, 1), (6, 3), (9, 3))
_SAMPLE_METRICS = ("df_loss", "dmd_loss", "student_loss", "critic_loss", "dmd_grad_mean_abs", "dmd_t_mean",
                   "sync_confidence", "reward_weight_mean")
STAGE_DEFAULTS = {
    "df": {"lr": 1e-5, "betas": (0.9, 0.999)},
    "sf": {"lr": 2e-6, "betas": (0.0, 0.999)},
}


# the paper's learning rates are for 1.3B; the tiny preset needs about 10x more (measured on the world)
TINY_STAGE_DEFAULTS = {"df": {"lr": 1e-4}, "sf": {"lr": 2e-5}}
# the authors' training code: shifted DMD / critic timesteps clamped to <= 0.999, and the training rollout starts
# from 0.999 * eps (inference starts from eps)
MAX_DMD_T = 0.999
ROLLOUT_NOISE_SCALE = 0.999


# --------------------------------------------------------------------------------------------------- config
@dataclass
class DataConfig:
    """``kind="synthetic"``: random clips of the given shape (:class:`~lipforcing.distill.data.SyntheticLatentDataset`);
    ``kind="files"``: precomputed clips under ``path`` (:class:`~lipforcing.distill.data.LatentFileDataset`)."""

    kind: str = "synthetic"
    path: Optional[str] = None
    num_samples: int = 8
    frames: int = 6
    height: int = 8
    width: int = 8
    text_len: int = 8


@dataclass
class RewardConfig:
    """SyncNet reward (stage 2).  ``decoder``: ``"vae"`` (``lipforcing.load_vae(vae_path)``) or ``"latent_rgb"``
    (a fixed linear preview, for smoke tests).  ``syncnet_path``: SyncNet v2 weights (None: random weights, only
    for tests)."""

    enabled: bool = False
    beta: float = 2.0
    vshift: int = 15
    padding: str = "overlap"
    decoder: str = "vae"
    vae_path: Optional[str] = None
    decoder_scale: int = 8
    syncnet_path: Optional[str] = None


@dataclass
class TrainConfig:
    """Everything a distillation run needs (see the module docstring for the YAML form)."""

    stage: str = "df"
    model: str = "tiny"
    model_overrides: dict = field(default_factory=dict)
    teacher_model: Optional[str] = None
    teacher_path: Optional[str] = None
    critic_path: Optional[str] = None
    student_init: Optional[str] = None
    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 1
    iterations: int = 10
    lr: Optional[float] = None
    betas: Optional[tuple] = None
    weight_decay: float = 0.01
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = 10.0
    critic_lr: Optional[float] = None
    critic_betas: Optional[tuple] = None
    critic_grad_clip: Optional[float] = None
    critic_updates_per_student: int = 5
    timesteps: tuple = schedule.STUDENT_TIMESTEPS
    df_random_attention: bool = True
    df_attention_configs: tuple = DF_ATTENTION_CONFIGS
    guidance_band: tuple = (0.556, 0.882)
    guidance_scale: float = 4.5
    guidance_inverted: bool = False
    reward: RewardConfig = field(default_factory=RewardConfig)
    precision: str = "fp32"
    attn_backend: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: str = "auto"
    fsdp_per_block: bool = True
    device: str = "auto"
    seed: int = 0
    output_dir: str = "runs/distill"
    save_every: int = 0
    log_every: int = 1
    plot_every: int = 0
    resume: bool = True
    rollout_noise_scale: float = ROLLOUT_NOISE_SCALE
    max_dmd_t: float = MAX_DMD_T

    def __post_init__(self):
        try:
            self._check()
        except TrainConfigError:
            raise
        except (ValueError, TypeError) as exc:
            raise TrainConfigError(str(exc)) from None

    def _check(self):
        from lipforcing.distill.stages.base import check_int, check_positive_number

        if isinstance(self.data, dict):
            self.data = _from_dict(DataConfig, self.data, "data")
        if isinstance(self.reward, dict):
            self.reward = _from_dict(RewardConfig, self.reward, "reward")
        for name in ("betas", "critic_betas", "timesteps", "guidance_band"):
            v = getattr(self, name)
            if isinstance(v, list):
                setattr(self, name, tuple(v))
        self.df_attention_configs = tuple(tuple(c) for c in self.df_attention_configs)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.fsdp not in ("auto", "on", "off"):
            raise ValueError(f"fsdp must be 'auto', 'on' or 'off', got {self.fsdp!r}")
        for name in ("batch_size", "critic_updates_per_student"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ValueError(f"iterations must be an int >= 0, got {self.iterations!r}")
        if self.data.kind not in ("synthetic", "files"):
            raise ValueError(f"data.kind must be 'synthetic' or 'files', got {self.data.kind!r}")
        if self.data.kind == "files" and not self.data.path:
            raise ValueError("data.kind='files' needs data.path")
        if self.attn_backend not in ("auto", "cuda", "triton", "reference"):
            raise ValueError(f"attn_backend must be auto, cuda, triton or reference, got {self.attn_backend!r}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.reward.decoder not in ("vae", "latent_rgb"):
            raise ValueError(f"reward.decoder must be 'vae' or 'latent_rgb', got {self.reward.decoder!r}")
        for name in ("lr", "critic_lr", "grad_clip", "critic_grad_clip"):
            check_positive_number(name, getattr(self, name), allow_none=True)
        check_positive_number("weight_decay", self.weight_decay, allow_zero=True)
        check_positive_number("rollout_noise_scale", self.rollout_noise_scale)
        check_positive_number("max_dmd_t", self.max_dmd_t)
        if self.data.kind == "synthetic":
            for name in ("num_samples", "frames", "height", "width", "text_len"):
                check_int(f"data.{name}", getattr(self.data, name))
        if not isinstance(self.model_overrides, dict):
            raise TrainConfigError(f"model_overrides must be a mapping, got {type(self.model_overrides).__name__}")
        for what, fn in (("model", self.model_config), ("teacher_model", self.teacher_config)):
            try:
                fn()
            except (TypeError, ValueError) as exc:
                raise TrainConfigError(f"{what}: {exc}") from None

    # stage defaults
    @property
    def student_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        if self.model == "tiny":
            return TINY_STAGE_DEFAULTS[self.stage]["lr"]
        return STAGE_DEFAULTS[self.stage]["lr"]

    @property
    def student_betas(self) -> tuple:
        return STAGE_DEFAULTS[self.stage]["betas"] if self.betas is None else tuple(self.betas)

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_name(self.model, **dict(self.model_overrides))

    def teacher_config(self) -> ModelConfig:
        if self.teacher_model is None:
            return self.model_config()
        return ModelConfig.from_name(self.teacher_model)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _from_dict(cls, d, "config")

    @classmethod
    def from_yaml(cls, path, **overrides) -> "TrainConfig":
        """Read a YAML file (keys = field names; nested ``data:`` / ``reward:``); ``overrides`` win."""
        from lipforcing.distill.stages.base import read_config_yaml

        return cls.from_dict(read_config_yaml(path, overrides))


def _from_dict(cls, d: dict, where: str):
    from lipforcing.distill.stages.base import config_from_dict

    return config_from_dict(cls, d, where)


# --------------------------------------------------------------------------------------------------- data
def build_dataset(d: DataConfig, model_cfg: ModelConfig, *, seed: int = 0):
    """The dataset of a :class:`DataConfig`; problems with it (missing folder, no files, bad sizes) raise
    TrainConfigError."""
    from lipforcing.distill.data import LatentFileDataset, SyntheticLatentDataset

    try:
        if d.kind == "files":
            ds = LatentFileDataset(d.path, model_cfg)
        else:
            ds = SyntheticLatentDataset(model_cfg, num_samples=d.num_samples, frames=d.frames, height=d.height,
                                        width=d.width, text_len=d.text_len, seed=seed)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise TrainConfigError(f"data: {exc}") from None
    if len(ds) < 1:
        raise TrainConfigError("data: the dataset is empty")
    return ds


resolve_checkpoint = ckpt.resolve_checkpoint


# --------------------------------------------------------------------------------------------------- trainer
class Trainer(DFSteps, SFSteps):
    """One training run (see the module docstring).

    Parameters
    ----------
    config : TrainConfig.
    dataset : optional dataset of samples (overrides ``config.data``); see :mod:`lipforcing.distill.data`.
    reward : optional callable ``(latents, waveform) -> (weights (B,), confidence (B,))`` (overrides
        ``config.reward``), e.g. a :class:`lipforcing.distill.reward.SyncReward`.
    """

    def __init__(self, config: TrainConfig, *, dataset=None, reward=None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.cfg = cfg = config
        self.device = init_distributed(cfg.device)
        self.rank, self.world = dist_info()
        self.use_fsdp = cfg.fsdp == "on" or (cfg.fsdp == "auto" and self.world > 1)
        if self.use_fsdp and not torch.distributed.is_initialized():
            raise RuntimeError("fsdp='on' needs torch.distributed (run under torchrun)")
        self.out = Path(cfg.output_dir)
        self.iteration = 0
        self.history: list[dict] = []
        self.model_cfg = cfg.model_config()
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data, self.model_cfg, seed=cfg.seed)
        if len(self.dataset) < 1:
            raise TrainConfigError("the dataset is empty")
        self._build_models()
        self.reward = reward if reward is not None else self._build_reward()
        if cfg.resume and (self.out / "latest").is_file():
            self.load(self.out)

    # ------------------------------------------------------------------------------------------------ setup
    def _load_or_build(self, path, config: ModelConfig, causal: bool):
        from lipforcing.model import build_model, load_model

        if path:
            p = Path(path)
            if p.is_dir():
                ck = resolve_checkpoint(p)
                names = ("student", "teacher", "critic") if causal else ("critic", "teacher", "student")
                for name in names:
                    if (ck / f"{name}.safetensors").is_file():
                        p = ck / f"{name}.safetensors"
                        break
            elif not p.exists():
                raise TrainConfigError(f"{p}: no such checkpoint")
            try:
                return load_model(p, config=config, causal=causal, device=self.device)
            except (FileNotFoundError, TrainConfigError):
                raise
            except Exception as exc:  # unpickling, safetensors and shape errors: say which file
                raise TrainConfigError(f"{p}: cannot load model weights ({type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:300]})") from None
        return build_model(config, causal=causal, device=self.device)

    def _build_models(self):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical random init on every rank
        scfg = self.model_cfg
        self.teacher = self.critic = self.critic_opt = None
        if cfg.stage == "sf" or cfg.teacher_path:
            tcfg = cfg.teacher_config()
            if not cfg.teacher_path:
                log.warning("no teacher_path: the teacher has random weights (tests / smoke runs only)")
            teacher = self._load_or_build(cfg.teacher_path, tcfg, causal=False)
            teacher.requires_grad_(False).eval()
        else:
            teacher = None
        if cfg.student_init:
            student = self._load_or_build(cfg.student_init, scfg, causal=True)
        else:
            from lipforcing.model import build_model

            student = build_model(scfg, causal=True, device=self.device)
            if teacher is not None and teacher.config == scfg:
                student.load_state_dict(teacher.state_dict())  # the student starts from the teacher (paper)
            elif cfg.stage == "sf":
                log.warning("stage sf without student_init: the student starts from random weights (normally the "
                            "stage-1 diffusion-forcing checkpoint)")
        student.train()
        student.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.stage == "sf":
            if cfg.critic_path:
                critic = self._load_or_build(cfg.critic_path, teacher.config, causal=False)
            else:
                from lipforcing.model import build_model

                critic = build_model(teacher.config, causal=False, device=self.device)
                critic.load_state_dict(teacher.state_dict())  # the fake score starts from the teacher
            critic.train()
            critic.gradient_checkpointing = cfg.gradient_checkpointing
        else:
            critic = None
            teacher = None if cfg.stage == "df" else teacher
        for m in (student, critic, teacher):
            if m is not None:
                m.attn_backend = cfg.attn_backend
        if self.use_fsdp:
            for m in (student, critic, teacher):
                if m is not None:
                    shard_model(m, per_block=cfg.fsdp_per_block)
        self.student, self.critic, self.teacher = student, critic, teacher
        self.student_opt = torch.optim.AdamW(student.parameters(), lr=cfg.student_lr, betas=cfg.student_betas,
                                             weight_decay=cfg.weight_decay, eps=cfg.adam_eps)
        if critic is not None:
            clr = cfg.student_lr if cfg.critic_lr is None else float(cfg.critic_lr)
            cb = cfg.student_betas if cfg.critic_betas is None else tuple(cfg.critic_betas)
            self.critic_opt = torch.optim.AdamW(critic.parameters(), lr=clr, betas=cb,
                                                weight_decay=cfg.weight_decay, eps=cfg.adam_eps)

    # ------------------------------------------------------------------------------------------------ randomness
    def generator(self, *tags) -> torch.Generator:
        """A CPU generator determined by (seed, tags) only: identical across ranks, runs and resumes."""
        h = hashlib.sha256(repr((self.cfg.seed,) + tags).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))

    def sample_gens(self, k: int, tag: str) -> list[torch.Generator]:
        """One generator per local sample of iteration k (keyed by the *global* sample index)."""
        B = self.cfg.batch_size
        return [self.generator(k, tag, self.rank * B + b) for b in range(B)]

    def batch(self, k: int) -> dict:
        """This rank's slice of the global batch of iteration k."""
        from lipforcing.distill.data import collate

        B = self.cfg.batch_size
        idx = torch.randint(len(self.dataset), (B * self.world,), generator=self.generator(k, "data"))
        return collate([self.dataset[int(i)] for i in idx[self.rank * B:(self.rank + 1) * B]])

    def autocast(self):
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _clip(self, model, max_norm) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if max_norm is None:
            max_norm = float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, float(max_norm))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> dict:
        """Run iteration ``self.iteration`` and advance."""
        k = self.iteration
        t0 = time.perf_counter()
        m = self.df_step(k) if self.cfg.stage == "df" else self.sf_step(k)
        m = self._global_metrics(m)
        self.iteration = k + 1
        m = {"iteration": k, **m, "seconds": time.perf_counter() - t0}
        self.history.append(m)
        return m

    def _global_metrics(self, m: dict) -> dict:
        """Average the per-rank sample statistics over ranks (grad norms are already global)."""
        keys = [k for k in m if k in _SAMPLE_METRICS]
        if self.world == 1 or not keys:
            return m
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        vals = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(vals)
        return {**m, **{k: v / self.world for k, v in zip(keys, vals.tolist())}}

    def train(self, iterations: int | None = None, *, stop=None) -> list[dict]:
        """Run until ``iterations`` (default ``config.iterations``) total iterations are done, or until ``stop`` (a
        :class:`~lipforcing.distill.stages.base.StopRequest`) says so before an iteration (``self.stopped``: why);
        save at ``save_every`` and at the end.  Returns the metrics of the iterations run."""
        from lipforcing.distill.stages.base import stop_reason

        total = self.cfg.iterations if iterations is None else int(iterations)
        ran = []
        self.stopped = None
        while self.iteration < total:
            self.stopped = stop_reason(stop, self.device)
            if self.stopped:
                break
            m = self.step()
            ran.append(m)
            if self.rank == 0 and self.cfg.log_every and (m["iteration"] % self.cfg.log_every == 0):
                self._log(m)
            if self.cfg.save_every and self.iteration % self.cfg.save_every == 0:
                self.save()
            if self.rank == 0 and self.cfg.plot_every and self.iteration % self.cfg.plot_every == 0:
                from lipforcing.distill.runlog import plot_curves

                plot_curves(self.out)
        if ran and not (self.cfg.save_every and self.iteration % self.cfg.save_every == 0):
            self.save()
        if ran and self.rank == 0:
            from lipforcing.distill.runlog import plot_curves

            plot_curves(self.out)
        return ran

    def _log(self, m: dict) -> None:
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())
        log.info("train %s: %s", self.cfg.stage, text)
        from lipforcing.distill.runlog import append_metrics

        append_metrics(self.out, self.cfg.stage, m)

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _models(self) -> dict:
        d = {"student": (self.student, self.student_opt)}
        if self.critic is not None:
            d["critic"] = (self.critic, self.critic_opt)
        return d

    def save(self, path=None) -> Path:
        """Write a checkpoint (all ranks must call; rank 0 writes).  Returns its directory."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        from lipforcing.model.loading import CONFIG_METADATA_KEY

        ck = Path(path) if path is not None else self.out / f"ckpt-{self.iteration:06d}"
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        payload = {}
        for name, (model, opt) in self._models().items():
            payload[name] = (get_model_state_dict(model, options=opts),
                             get_optimizer_state_dict(model, opt, options=opts), model.config)
        if self.rank == 0:
            # every file atomically (temp + fsync + rename); trainer.json and then `latest` last
            ck.mkdir(parents=True, exist_ok=True)
            for name, (msd, osd, mcfg) in payload.items():
                ckpt.save_tensors(msd, ck / f"{name}.safetensors",
                                  {CONFIG_METADATA_KEY: json.dumps(mcfg.to_dict()), "causal": str(name == "student")})
                tensors, meta = ckpt.flatten_optim(osd)
                ckpt.save_tensors(tensors, ck / f"optim_{name}.safetensors", meta)
            ckpt.write_checkpoint_meta(ck, self.out if path is None else None,
                                       {"iteration": self.iteration, "stage": self.cfg.stage,
                                        "config": self.cfg.to_dict()})
        self._barrier()
        return ck

    def load(self, path) -> None:
        """Resume from a checkpoint directory (or a run directory's ``latest``): weights, optimiser states and
        the iteration counter."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        ck = resolve_checkpoint(path)
        meta = ckpt.read_trainer_json(ck)                   # iteration >= 0, stage a string
        if meta["stage"] != self.cfg.stage:
            raise TrainConfigError(f"checkpoint {ck} is from stage {meta['stage']!r}, this run is "
                                   f"{self.cfg.stage!r}")
        opts = StateDictOptions(full_state_dict=True)
        loaded = {}
        for name in self._models():                         # read and check every file before changing anything
            sd, _ = ckpt.load_tensors(ck / f"{name}.safetensors")          # NaN/inf weights refused
            f = ck / f"optim_{name}.safetensors"
            tensors, ometa = ckpt.load_tensors(f)
            loaded[name] = (sd, ckpt.unflatten_optim(tensors, ometa, source=f))
        for name, (model, opt) in self._models().items():
            sd, osd = loaded[name]
            try:
                set_model_state_dict(model, sd, options=opts)
                if osd["state"]:
                    with ckpt.keep_config_hyper(opt, name):     # moments from the file, lr etc. from the config
                        set_optimizer_state_dict(model, opt, optim_state_dict=osd, options=opts)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise TrainConfigError(f"{ck / (name + '.safetensors')}: does not fit this run's {name} "
                                       f"({' '.join(str(exc).split())[:300]})") from None
        self.iteration = int(meta["iteration"])
        log.info("resumed %s from %s at iteration %d", self.cfg.stage, ck, self.iteration)

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
