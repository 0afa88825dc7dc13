"""``lipforcing demo``: the main job end to end on a synthetic input, in well under a minute on a CPU.

It draws a short face clip (an oval face with eyes and a mouth), synthesises speech-like audio (voiced, formant-
shaped syllables with pauses), streams the audio through a :class:`lipforcing.Session` of the embedded default
model in 20 ms pieces exactly like a real-time host would, writes the frames it gets back, with their audio, to
``demo.mp4`` (synthetic input on the left, model output on the right) and prints a profile summary.

The embedded default model is the ``tiny`` preset with fixed random weights (seed 0): it is untrained, so the
right half of the video is not lip sync; the demo shows the pipeline and its speed.  Trained students run through
the same path with ``lipforcing sync --checkpoint ...``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from lipforcing.cli import UserError
from lipforcing.cli._common import (add_decoder_arg, check_device, check_resolution, load_engine, progress,
                                    seed_arg)

HELP = ("stream a synthetic face clip and speech through the embedded default model, write demo.mp4 and print a "
        "profile summary")

DEFAULT_RESOLUTION = 64      # face-crop size of the demo (the tiny preset works at any multiple of 16)
DISPLAY_SIZE = 256           # each half of demo.mp4 is upscaled (nearest) to this size


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo.mp4", help="output video (default demo.mp4)")
    p.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic speech (default 4)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--resolution", type=int, default=DEFAULT_RESOLUTION,
                   help=f"face-crop size the model works at (default {DEFAULT_RESOLUTION})")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: the tiny model's tensors are too small to split)")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the synthetic input and the noise")
    add_decoder_arg(p)


def _upscale(img: np.ndarray, k: int) -> np.ndarray:
    return img if k == 1 else np.repeat(np.repeat(img, k, axis=0), k, axis=1)


def run(args) -> int:
    from lipforcing import face
    from lipforcing.media import (MediaError, VideoWriter, check_output_file, frame_loudness, synthetic_face_clip,
                                  synthetic_speech)
    from lipforcing.profiling import StageTimer, StreamPlan, stream_utterance, summarize_chunks

    if not (0.2 <= args.seconds <= 600):
        raise UserError(f"--seconds must be between 0.2 and 600, got {args.seconds}")
    if args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    check_output_file(args.output)
    check_device(args.device)
    check_resolution(args.resolution)
    torch.set_num_threads(args.threads)
    print("lipforcing demo: the embedded default model is the tiny preset with FIXED RANDOM WEIGHTS (untrained).\n"
          "  The output is NOT real lip sync: the demo shows the streaming pipeline and its speed.  For real output\n"
          "  run `lipforcing sync --video face.mp4 --audio speech.wav --checkpoint student.safetensors --model 1.3b`.")
    t_start = time.perf_counter()
    engine, load_s = load_engine(model="tiny", device=args.device, resolution=args.resolution, seed=0,
                                 debug=args.debug, decoder=args.decoder)
    res = engine.resolution
    n_frames = -(-int(round(args.seconds * 16000)) // 640)
    pcm = synthetic_speech(args.seconds, 16000, seed=args.seed)
    # the reference clip: a face talking to *other* speech (the job: re-dub it to the new audio)
    other = frame_loudness(synthetic_speech(args.seconds, 16000, seed=args.seed + 1), n_frames)
    reference = synthetic_face_clip(n_frames, res, mouth_open=other, seed=args.seed)
    print(f"  input: {args.seconds:g} s of synthetic speech (16 kHz) and a {n_frames}-frame {res[0]}x{res[1]} "
          f"synthetic face clip; model: {engine.config.num_layers} blocks, dim {engine.config.dim}, on {engine.device}")

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
    k = max(1, DISPLAY_SIZE // max(res))
    timer = StageTimer(engine.device)
    engine.stage = timer
    try:
        writer = VideoWriter(args.output, width=2 * res[1] * k, height=res[0] * k, fps=25, sample_rate=16000)
    except MediaError as exc:
        raise UserError(str(exc)) from exc

    def on_frame(frame):
        left = reference[face.pingpong_index(frame.index, len(reference))]
        writer.write(np.concatenate([_upscale(left, k), _upscale(frame.image, k)], axis=1), audio=frame.audio)

    try:
        with progress(n_frames, "streaming") as bar:
            with engine.session(reference, seed=args.seed) as session:
                stream = stream_utterance(session, pcm, plan, chunks, bar=bar, on_frame=on_frame)
    finally:
        writer.close()
        del engine.stage
    summary = summarize_chunks(engine, timer.chunks())
    total_s = time.perf_counter() - t_start

    lat = summary["chunk_latency_ms"]
    fps = stream.frames / stream.wall_s
    print(f"\nwrote {args.output}: {writer.frames} frames, {writer.width}x{writer.height}, 25 fps, "
          f"{writer.samples / 16000:.2f} s of audio (left: the synthetic input face, right: the model output, "
          f"upscaled {k}x)")
    print(f"\nprofile (tiny preset, {res[0]}x{res[1]}, {engine.device}, {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() != 1 else ''}; "
          f"engine load {load_s:.2f} s and a {warm_s:.2f} s warm-up chunk excluded):")
    print(f"  {'frames':<24}{stream.frames:>12}   in {chunks} chunks (first {plan.first} frames, then {plan.per})")
    print(f"  {'FPS':<24}{fps:>12.1f}   frames out / wall time ({stream.wall_s:.2f} s, video writing included); "
          f"real time is 25")
    print(f"  {'time to first frame':<24}{stream.first_frame_s:>10.3f} s   compute after the first chunk's audio "
          f"(+ {engine.latency_report()['first_chunk_audio_ms'] / 1e3:.3f} s of audio buffering)")
    print(f"  {'chunk latency':<24}{lat['p50']:>9.1f} ms   p50; p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f} ms")
    print(f"  {'stage':<24}{'ms/chunk':>12}{'share':>9}")
    for name, st in summary["stages"].items():
        print(f"  {name:<24}{st['mean_ms_per_chunk']:>12.2f}{100 * st['share']:>8.1f}%")
    print(f"\ndone in {total_s:.1f} s.  More numbers: lipforcing profile --model tiny --plot profile.png "
          "(or --model 1.3b on a GPU)")
    return 0
