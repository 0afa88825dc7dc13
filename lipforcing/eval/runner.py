"""``lipforcing eval``: lip sync and fidelity of streaming engines on held-out world clips, with controls.

For each held-out clip (held-out identities and speech, :func:`held_out_clips`) the engine streams the clip's audio
against the **reference video** (the same person and head motion, with the mouth of unrelated speech: the input
of a video-to-video lip sync), and the output is measured (:mod:`lipforcing.eval.metrics`):

* ``sync``: windowed correlation of the mouth opening read from the pixels with the audio's loudness;
  ``sync_gt``: with the world's true opening for that audio; ``sync_shuffled``: with the loudness of another
  clip's audio (a system that follows its audio scores ~0 here);
* ``lse_c`` / ``lse_d``: SyncNet confidence / distance (the world's SyncNet, when given);
* ``mouth_psnr`` / ``mouth_ssim``: the generated region against the ground-truth rendering for that audio;
  ``rest_psnr``: outside the region against the reference video (the input must pass through);
* ``ref_copy``: correlation of the opening with the *reference's* mouth (copying the input's mouth scores high);
* ``silence_open``: mean opening when the audio is silence (the mouth must close: ground truth 0);
* ``fps``: frames per wall second of the stream (engines) or of the whole-clip generation (the teacher: VAE
  encode, sampling and decode), after one warm-up run of each system.

Systems: streaming engines (:class:`lipforcing.Engine`, the students) and whole-clip generators (anything with
``generate(reference, audio) -> (frames, fps)``, e.g. the teacher, :class:`lipforcing.eval.teacher.TeacherSystem`).

Controls in every report: ``ground_truth`` (the world's rendering for the audio), ``vae_roundtrip`` (the ground
truth encoded and decoded by the world VAE, when ``vae`` is given: the ceiling of any latent model),
``reference_copy`` (the input video unchanged), ``untrained`` (random weights, when given) next to the teacher
and the students; ``sync_shuffled`` and ``silence_open`` are the shuffled-audio and silence controls of each row.
Rows are ordered by :func:`row_order`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lipforcing.eval.metrics import frame_loudness, mouth_opening_estimate, psnr, ssim, windowed_correlation

__all__ = ["EvalConfig", "held_out_clips", "run_engine", "run_system", "vae_roundtrip", "truth_frames", "evaluate",
           "write_report", "row_order", "COLUMNS", "CONTROLS"]

COLUMNS = (("sync", "sync (opening~loudness)"), ("sync_gt", "sync (vs true opening)"),
           ("sync_shuffled", "shuffled audio"), ("lse_c", "LSE-C"), ("lse_d", "LSE-D"),
           ("mouth_psnr", "mouth PSNR"), ("mouth_ssim", "mouth SSIM"), ("rest_psnr", "rest PSNR vs ref"),
           ("ref_copy", "ref-mouth copying"), ("silence_open", "silence opening"), ("fps", "FPS"))

CONTROLS = ("Controls: ground_truth = the world's rendering for the audio; vae_roundtrip = the ground truth encoded "
            "and decoded by the world VAE (the ceiling of any latent model); reference_copy = the input video "
            "unchanged; untrained = random weights; 'shuffled audio' = sync with another clip's audio; "
            "'silence opening' = mean mouth opening on silent audio.")


@dataclass
class EvalConfig:
    clips: int = 4
    seconds: float = 8.0
    size: int = 64
    seed: int = 0
    speech: str = "auto"
    window: int = 50
    long_seconds: float = 0.0
    warmup: bool = True         # run each system once on a short piece first, so no row's FPS pays one-time costs


def held_out_clips(cfg: EvalConfig):
    """``cfg.clips`` world clips of held-out identities and speech (deterministic in ``cfg.seed``)."""
    from lipforcing.world import make_clip

    n = int(round(cfg.seconds * 25))
    return [make_clip(10_000_019 + cfg.seed * 7919 + i, n, size=cfg.size, split="eval", speech=cfg.speech)
            for i in range(cfg.clips)]


def truth_frames(clip, audio: np.ndarray) -> np.ndarray:
    """The world's rendering of ``clip``'s person and motion saying ``audio``."""
    from lipforcing.world.clip import render_speaking

    return render_speaking(clip.identity, audio, len(clip.frames), motion=clip.motion, blink=clip.blink,
                           size=clip.frames.shape[1:3])[0]


def run_engine(engine, reference: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, float]:
    """Stream ``audio`` against ``reference`` frames; returns (frames (T, H, W, 3) uint8, frames per second)."""
    t0 = time.perf_counter()
    sess = engine.session(reference)
    try:
        sess.push_audio(np.asarray(audio, np.float32))
        sess.end_of_speech()
        out = [f.image for f in sess.frames()]
    finally:
        sess.close()
    dt = time.perf_counter() - t0
    return np.stack(out)[:len(reference)], len(out) / max(dt, 1e-9)


def run_system(system, reference: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, float]:
    """An engine streamed with :func:`run_engine`, or a whole-clip system's ``generate(reference, audio)``."""
    if callable(getattr(system, "generate", None)):
        frames, fps = system.generate(reference, audio)
        return frames[:len(reference)], fps
    return run_engine(system, reference, audio)


@torch.no_grad()
def vae_roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) uint8 frames encoded and decoded by ``vae`` as one clip (bit-equal to its streaming encoder
    and decoder; the engine's decode path), converted back to uint8 like the engine's frames.  A T that is not
    1 + 4k is padded with copies of the last frame, and the padding is dropped after decoding."""
    from lipforcing.eval.teacher import to_uint8

    T = len(frames)
    tf = vae.temporal_factor
    pad = (-(T - 1)) % tf
    x = np.concatenate([frames, np.repeat(frames[-1:], pad, 0)]) if pad else frames
    video = torch.from_numpy(np.ascontiguousarray(x)).permute(3, 0, 1, 2)[None].to(vae.device, vae.dtype)
    rec = vae.decode(vae.encode(video / 127.5 - 1.0, normalize=True), normalize=True)
    return to_uint8(rec[0])[:T]


def row_order(names) -> list[str]:
    """ground_truth, vae_roundtrip, reference_copy, the teacher rows (``teacher*``), the other systems (students,
    in the given order), untrained."""
    names = list(names)
    head = [n for n in ("ground_truth", "vae_roundtrip", "reference_copy") if n in names]
    teachers = [n for n in names if n.startswith("teacher") and n not in head]
    rest = [n for n in names if n not in head and n not in teachers and n != "untrained"]
    return head + teachers + rest + (["untrained"] if "untrained" in names else [])


def _measure(frames, clip, audio, other_audio, truth, region, syncnet, window) -> dict:
    T = len(frames)
    from lipforcing.world.mouth import mouth_track

    est = mouth_opening_estimate(frames, clip)
    m = {"sync": windowed_correlation(est, frame_loudness(audio, T), window=window),
         "sync_gt": windowed_correlation(est, mouth_track(audio, T).opening, window=window),
         "sync_shuffled": windowed_correlation(est, frame_loudness(other_audio, T), window=window),
         "ref_copy": windowed_correlation(est, clip.ref_mouth.opening[:T], window=window),
         "mouth_psnr": psnr(frames, truth[:T], region), "mouth_ssim": ssim(frames, truth[:T], region),
         "rest_psnr": psnr(frames, clip.ref_frames[:T], ~region), "opening_mean": float(est.mean())}
    if syncnet is not None:
        from lipforcing.distill.syncnet import sync_confidence

        s = sync_confidence(syncnet, frames, audio[:T * 640], vshift=15)
        m["lse_c"], m["lse_d"] = float(s.confidence), float(s.distance)
    return m


def _mean(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        v = [r[k] for r in rows if k in r and isinstance(r[k], (int, float)) and math.isfinite(r[k])]
        out[k] = float(np.mean(v)) if v else float("nan")
    return out


def evaluate(engines: dict, cfg: EvalConfig | None = None, *, syncnet=None, strip_path=None, vae=None) -> dict:
    """Evaluate ``engines`` ({name: system}: an Engine, streamed, or an object with ``generate(reference, audio)``
    such as the teacher; e.g. {"teacher_cfg4.5": ..., "model": ..., "untrained": ...}) with the controls; ``vae``
    (the world VAE) adds the ``vae_roundtrip`` row.

    Returns {"config", "rows": {system: mean metrics}, "per_clip": {system: [metrics]}, "stability": {...}}, rows
    in :func:`row_order`."""
    from lipforcing import face

    cfg = cfg or EvalConfig()
    taken = {"ground_truth", "reference_copy"} | ({"vae_roundtrip"} if vae is not None else set())
    if taken & set(engines):
        raise ValueError(f"system names {sorted(taken & set(engines))} are the controls' rows; rename them")
    clips = held_out_clips(cfg)
    H, W = clips[0].frames.shape[1:3]
    region = face.mouth_mask(H, W).numpy()
    per: dict[str, list] = {}
    strip: dict[str, np.ndarray] = {}
    silence = np.zeros_like(clips[0].audio)
    if cfg.warmup:
        n = min(len(clips[0].frames), 21)
        for eng in engines.values():
            run_system(eng, clips[0].ref_frames[:n], clips[0].audio[:n * 640])
    for i, clip in enumerate(clips):
        other = clips[(i + 1) % len(clips)].audio if len(clips) > 1 else np.roll(clip.audio, len(clip.audio) // 2)
        truth = clip.frames
        systems = {"ground_truth": (truth, None), "reference_copy": (clip.ref_frames, None)}
        silent_truth = truth_frames(clip, silence)
        if vae is not None:
            systems["vae_roundtrip"] = (vae_roundtrip(vae, truth), None)
        for name, eng in engines.items():
            systems[name] = run_system(eng, clip.ref_frames, clip.audio)
        for name, (frames, fps) in systems.items():
            m = _measure(frames, clip, clip.audio, other, truth, region, syncnet, cfg.window)
            if fps is not None:
                m["fps"] = fps
            if name == "ground_truth":
                m["silence_open"] = float(mouth_opening_estimate(silent_truth, clip).mean())
            elif name == "reference_copy":
                m["silence_open"] = m["opening_mean"]
            elif name == "vae_roundtrip":
                m["silence_open"] = float(mouth_opening_estimate(vae_roundtrip(vae, silent_truth), clip).mean())
            else:
                quiet, _ = run_system(engines[name], clip.ref_frames, silence)
                m["silence_open"] = float(mouth_opening_estimate(quiet, clip).mean())
            per.setdefault(name, []).append(m)
            if i == 0:
                strip[name] = frames
    order = row_order(per)
    result = {"config": asdict(cfg), "rows": {k: _mean(per[k]) for k in order}, "per_clip": {k: per[k] for k in order}}
    if cfg.long_seconds > 0:
        result["stability"] = _stability(engines, cfg, region)
    if strip_path is not None:
        draw_strip({k: strip[k] for k in row_order(strip)}, clips[0], strip_path)
    return result


def _stability(engines: dict, cfg: EvalConfig, region) -> dict:
    """Sync and mouth PSNR over the first and the last third of one long held-out clip, per engine."""
    from lipforcing.world import make_clip

    n = int(round(cfg.long_seconds * 25))
    clip = make_clip(20_000_003 + cfg.seed, n, size=cfg.size, split="eval", speech=cfg.speech)
    out = {}
    for name, eng in engines.items():
        frames, fps = run_system(eng, clip.ref_frames, clip.audio)
        est = mouth_opening_estimate(frames, clip)
        loud = frame_loudness(clip.audio, n)
        third = n // 3
        parts = {}
        for label, sl in (("first", slice(0, third)), ("last", slice(n - third, n))):
            parts[label] = {"sync": windowed_correlation(est[sl], loud[sl], window=cfg.window),
                            "mouth_psnr": psnr(frames[sl], clip.frames[sl], region)}
        out[name] = {"seconds": cfg.long_seconds, "fps": fps, **parts}
    return out


def draw_strip(systems: dict, clip, path, *, count: int = 8) -> None:
    """PNG: a row of frames per system (``count`` frames over the first 2 s) above the loudness curve and the
    openings read from each system's pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T = min(len(f) for f in systems.values())
    span = min(T, 50)
    idx = np.linspace(0, span - 1, count).round().astype(int)
    names = list(systems)
    fig = plt.figure(figsize=(count * 1.1, 1.15 * len(names) + 2.4))
    gs = fig.add_gridspec(len(names) + 1, 1, height_ratios=[1] * len(names) + [2.0])
    for r, name in enumerate(names):
        ax = fig.add_subplot(gs[r])
        ax.imshow(np.concatenate([systems[name][i] for i in idx], 1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    ax = fig.add_subplot(gs[-1])
    loud = frame_loudness(clip.audio, T)[:span]
    ax.plot(loud / max(loud.max(), 1e-9), "k", lw=2, label="loudness")
    for name in names:
        ax.plot(mouth_opening_estimate(systems[name][:span], _slice_clip(clip, span)), lw=1, label=name)
    for i in idx:
        ax.axvline(i, color="0.85", lw=0.5)
    ax.set_xlim(0, span - 1)
    ax.set_xlabel("frame (25 fps)")
    ax.set_ylabel("opening")
    ax.legend(fontsize=6, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _slice_clip(clip, n):
    import copy

    from lipforcing.world.motion import HeadMotion

    c = copy.copy(clip)
    c.motion = HeadMotion(*(np.asarray(getattr(clip.motion, k))[:n] for k in ("dx", "dy", "tilt", "scale")))
    c.blink, c.boxes = clip.blink[:n], clip.boxes[:n]
    c._calibration = None
    return c


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def write_report(result: dict, out_dir) -> tuple[Path, Path]:
    """``eval.json`` and ``eval.md`` (the table) under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jp, mp = out / "eval.json", out / "eval.md"
    jp.write_text(json.dumps(result, indent=1, default=float))
    c = result["config"]
    lines = [f"Held-out world clips: {c['clips']} x {c['seconds']} s at {c['size']} px (seed {c['seed']}, "
             f"window {c['window']} frames).", "",
             "| system | " + " | ".join(label for _, label in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    rows = result["rows"]
    for name in row_order(rows):
        lines.append(f"| {name} | " + " | ".join(_fmt(rows[name].get(k)) for k, _ in COLUMNS) + " |")
    lines += ["", CONTROLS]
    if "stability" in result:
        lines += ["", "| engine | seconds | sync first third | sync last third | mouth PSNR first | last | FPS |",
                  "|---|---|---|---|---|---|---|"]
        for name in row_order(result["stability"]):
            s = result["stability"][name]
            lines.append(f"| {name} | {s['seconds']:g} | {_fmt(s['first']['sync'])} | {_fmt(s['last']['sync'])} | "
                         f"{_fmt(s['first']['mouth_psnr'])} | {_fmt(s['last']['mouth_psnr'])} | {_fmt(s['fps'])} |")
    mp.write_text("\n".join(lines) + "\n")
    return jp, mp
