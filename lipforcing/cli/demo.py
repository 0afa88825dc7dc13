"""``lipforcing demo``: the main job end to end on a synthetic input, in well under a minute on a CPU.

It draws a short face clip (an oval face with eyes and a mouth) moving inside a 640x360 frame, synthesises
speech-like audio (voiced, formant-shaped syllables with pauses), streams the audio through a
:class:`lipforcing.Session` of the embedded default model in 20 ms pieces exactly like a real-time host would (the
session detects, tracks and aligns the face, and pastes the generated mouth back into the full frames), writes the
frames it gets back, with their audio, to ``demo.mp4`` (input on the left, output on the right, both at the
640x360 original resolution) and prints a profile summary.

The embedded default model is what ``Engine.load()`` loads: the weight bundle shipped in
``lipforcing/weights/default/`` (or the one ``LIPFORCING_DEFAULT_WEIGHTS`` names).  While none is shipped it is the
``tiny`` preset with fixed random weights (seed 0): untrained, so the right half of the video is not lip sync and
the demo shows the pipeline and its speed.  The demo says which of the two it ran.  Other students run through the
same path with ``lipforcing sync --checkpoint ...``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from lipforcing.cli import UserError
from lipforcing.cli._common import (add_decoder_arg, check_device, check_resolution, load_engine, progress,
                                    seed_arg, set_threads, writing_video)

HELP = ("stream a synthetic face clip and speech through the embedded default model, write demo.mp4 and print a "
        "profile summary")

FRAME_SIZE = (360, 640)      # (H, W) of the synthetic input video; demo.mp4 shows input | output at this size
FACE_SIZE = 200              # side of the drawn face clip placed in it


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo.mp4", help="output video (default demo.mp4)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic speech (default 4)")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--resolution", type=int, default=None,
                   help="face-crop size the model works at (default: the default model's; 32 for random tiny "
                        "weights, as in sync and profile)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default 1: the tiny model's tensors are too small to split)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the synthetic input and the noise")
    add_decoder_arg(p)


def weights_message(command: str, engine, checkpoint=None, model=None) -> str:
    """One line (two for random weights) saying what weights ``engine`` runs: the shipped default model, another
    bundle, the ``checkpoint`` given, or random ones (``model``: the preset named without a checkpoint)."""
    import os

    from lipforcing.weights import DEFAULT_FOLDER, ENV_VAR

    m = engine.manifest
    if m is not None:
        if checkpoint is not None:
            what = f"the weight bundle {m.name!r} from {m.folder}"
        elif m.folder.resolve() == DEFAULT_FOLDER:
            what = f"the default model {m.name!r} shipped with lipforcing"
        else:
            what = f"the default model {m.name!r} from {m.folder} ({ENV_VAR})"
        sync = m.eval.get("sync")
        return (f"{command}: weights: {what} ({m.resolution[1]}x{m.resolution[0]} crops, {m.model.num_layers} "
                f"blocks, dim {m.model.dim}" + (f", eval sync {sync:.2f}" if isinstance(sync, (int, float)) else "")
                + ")")
    if engine.random_weights:
        if model is not None:
            why = f"--model {model} without --checkpoint"
        elif os.environ.get(ENV_VAR, "").strip():
            why = f"{ENV_VAR}={os.environ[ENV_VAR].strip()}"
        else:
            why = "no default model is shipped in this install"
        return (f"{command}: RANDOM WEIGHTS ({why}): untrained, so the output is NOT real lip sync (it shows the "
                "streaming pipeline and its speed).\n  For real output run `lipforcing sync --video face.mp4 --audio "
                "speech.wav --model 1.3b --checkpoint student.safetensors --vae Wan2.1_VAE.pth --audio-encoder "
                "wav2vec2-base-960h/ --text prompt.safetensors`.")
    return f"{command}: weights: the student checkpoint {checkpoint}"


def _in_frames(faces: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Place a (N, s, s, 3) face clip into (N, H, W, 3) frames on a soft gradient, drifting slowly sideways."""
    H, W = size
    s = faces.shape[1]
    y = np.linspace(0, 1, H)[:, None, None]
    x = np.linspace(0, 1, W)[None, :, None]
    bg = (np.array([70.0, 80.0, 95.0]) * (1 - x) + np.array([150.0, 140.0, 120.0]) * x) * (0.8 + 0.2 * y)
    out = np.empty((len(faces), H, W, 3), np.uint8)
    out[:] = bg.astype(np.uint8)
    for i, f in enumerate(faces):
        x0 = int(W / 2 - s / 2 + 0.15 * W * np.sin(2 * np.pi * i / 100))
        y0 = (H - s) // 2
        out[i, y0:y0 + s, x0:x0 + s] = f
    return out


def run(args) -> int:
    import torch

    from lipforcing import face
    from lipforcing.media import (MediaError, VideoWriter, check_output_file, frame_loudness, synthetic_face_clip,
                                  synthetic_speech)
    from lipforcing.profiling import StageTimer, StreamPlan, stream_utterance, summarize_chunks

    if not (0.2 <= args.seconds <= 600):
        raise UserError(f"--seconds must be between 0.2 and 600, got {args.seconds}")
    check_output_file(args.output)
    dev = check_device(args.device)
    check_resolution(args.resolution)
    set_threads(args.threads, "tiny", dev)
    t_start = time.perf_counter()
    engine, load_s = load_engine(model=None, device=args.device, resolution=args.resolution, seed=0,
                                 debug=args.debug, decoder=args.decoder)
    print(weights_message("lipforcing demo", engine))
    res = engine.resolution
    n_frames = -(-int(round(args.seconds * 16000)) // 640)
    pcm = synthetic_speech(args.seconds, 16000, seed=args.seed)
    # the reference clip: a face talking to *other* speech (the job: re-dub it to the new audio)
    other = frame_loudness(synthetic_speech(args.seconds, 16000, seed=args.seed + 1), n_frames)
    reference = _in_frames(synthetic_face_clip(n_frames, FACE_SIZE, mouth_open=other, seed=args.seed), FRAME_SIZE)
    print(f"  input: {args.seconds:g} s of synthetic speech (16 kHz) and a {n_frames}-frame {FRAME_SIZE[1]}x"
          f"{FRAME_SIZE[0]} synthetic face video (the face is tracked, aligned to {res[1]}x{res[0]} crops and the "
          f"generated mouth pasted back); model: {engine.config.num_layers} blocks, dim {engine.config.dim}, on "
          f"{engine.device}")

    plan = StreamPlan(engine.first_chunk_frames, engine.chunk_frames, engine.lookahead_samples)
    # warm-up (excluded from the numbers): one chunk on a throwaway session
    t = time.perf_counter()
    with engine.session(reference[:1], seed=args.seed) as warm:
        warm.push_audio(pcm[: plan.first * 640])
        warm.end_of_speech()
        for _ in warm.frames():
            pass
    warm_s = time.perf_counter() - t

    chunks = 1 + max(0, -(-(n_frames - plan.first) // plan.per))
    timer = StageTimer(engine.device)
    engine.stage = timer
    try:
        writer = VideoWriter(args.output, width=2 * FRAME_SIZE[1], height=FRAME_SIZE[0], fps=25, sample_rate=16000)
    except MediaError as exc:
        raise UserError(str(exc)) from exc

    def on_frame(frame):
        left = reference[face.pingpong_index(frame.index, len(reference))]
        writer.write(np.concatenate([left, frame.image], axis=1), audio=frame.audio)

    t = time.perf_counter()
    session = engine.session(reference, seed=args.seed)          # detects, tracks and aligns the face (once)
    track_ms = 1e3 * (time.perf_counter() - t) / len(reference)
    try:
        with writing_video(writer, n_frames), progress(n_frames, "streaming") as bar, session:
            stream = stream_utterance(session, pcm, plan, chunks, bar=bar, on_frame=on_frame)
    finally:
        del engine.stage
    summary = summarize_chunks(engine, timer.chunks())
    total_s = time.perf_counter() - t_start

    lat = summary["chunk_latency_ms"]
    fps = stream.frames / stream.wall_s
    print(f"\nwrote {args.output}: {writer.frames} frames, {writer.width}x{writer.height}, 25 fps, "
          f"{writer.samples / 16000:.2f} s of audio (left: the synthetic input video, right: the output, the model's "
          f"{res[1]}x{res[0]} mouth pasted back)")
    model_name = "default model" if engine.manifest is not None else "tiny preset"
    print(f"\nprofile ({model_name}, {res[0]}x{res[1]}, {engine.device}, {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}; "
          f"engine load {load_s:.2f} s and a {warm_s:.2f} s warm-up chunk excluded):")
    print(f"  {'frames':<24}{stream.frames:>12}   in {chunks} chunks (first {plan.first} frames, then {plan.per})")
    print(f"  {'FPS':<24}{fps:>12.1f}   frames out / wall time ({stream.wall_s:.2f} s, video writing included); "
          f"real time is 25")
    print(f"  {'time to first frame':<24}{stream.first_frame_s:>10.3f} s   compute after the first chunk's audio "
          f"(+ {engine.latency_report()['first_chunk_audio_ms'] / 1e3:.3f} s of audio buffering)")
    print(f"  {'chunk latency':<24}{lat['p50']:>9.1f} ms   p50; p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f} ms")
    print(f"  {'face tracking':<24}{track_ms:>9.1f} ms   per reference frame, once when the session opens "
          "(detection, landmarks, smoothing; not in the FPS)")
    print(f"  {'stage':<24}{'ms/chunk':>12}{'share':>9}")
    for name, st in summary["stages"].items():
        print(f"  {name:<24}{st['mean_ms_per_chunk']:>12.2f}{100 * st['share']:>8.1f}%")
    print(f"\ndone in {total_s:.1f} s.  More numbers: lipforcing profile --model tiny --plot profile.png "
          "(or --model 1.3b on a GPU)")
    return 0
