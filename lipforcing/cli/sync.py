"""``lipforcing sync``: offline lip sync of a video + audio file pair through the streaming session API.

The video is any talking-head video, at any resolution and aspect ratio: the face is detected, tracked and aligned
to the model's crop, and the generated mouth region is pasted back, so the output has the video's own resolution
(frames without a face pass through unchanged).  A video that is already aligned face crops at the model's
resolution is used as it is.  The audio is any file FFmpeg reads (wav preferred), at any rate from 8 to 192 kHz (resampled to 16 kHz by the
session), or raw 16-bit PCM with ``--sample-rate``.  Without ``--audio`` the video's own audio track is used.
The audio is pushed in 20 ms pieces and the frames drained as they come, exactly as a real-time host would;
the output mp4 holds one frame per 40 ms of audio (the reference video is ping-ponged when shorter) and the
audio each frame covers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from lipforcing.cli import UserError
from lipforcing.cli._common import (DTYPES, PRESETS, add_decoder_arg, check_checkpoint, check_device,
                                    check_resolution, load_engine, progress, seed_arg, set_threads, writing_video)

HELP = "lip-sync a face video to an audio file (offline, through the streaming session API)"

_RAW_EXTENSIONS = (".pcm", ".raw", ".s16le")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", required=True, help="reference video: any talking-head video (any size), or aligned "
                                                  "face crops at the model's resolution")
    p.add_argument("--audio", help="speech to lip-sync to (wav/flac/mp3/m4a, or raw int16 mono with --sample-rate); "
                                   "default: the video's own audio track")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4)")
    p.add_argument("--model", default=None, choices=PRESETS,
                   help="model preset: without --checkpoint, random weights of it (NOT real lip sync); default: "
                        "the embedded default model (random tiny weights while none is shipped); with --checkpoint "
                        "the config is read from it when possible")
    p.add_argument("--checkpoint", help="student weights, or a weight bundle folder (manifest.json); default: the "
                                        "embedded default model")
    p.add_argument("--device", default=None, help="cuda, cpu (default: cuda if available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--resolution", type=int, default=None,
                   help="face-crop size the model runs at (default: the default model's; 512; 32 for the tiny "
                        "preset)")
    p.add_argument("--vae", default=None, help="Wan2.1 VAE checkpoint (Wan2.1_VAE.pth, or a diffusers folder); "
                                               "default: the default model's (random for the tiny preset)")
    p.add_argument("--audio-encoder", default=None,
                   help="local wav2vec2-base-960h folder (default: the built-in mel front end; a real checkpoint "
                        "needs wav2vec2)")
    p.add_argument("--text", default=None, help="prompt embedding file (.safetensors/.pt, 1 x L x 4096 UMT5 output)")
    p.add_argument("--mask", default=None,
                   help="mouth mask image (LatentSync's mask.png convention: white = keep, black = regenerate)")
    p.add_argument("--face-index", type=int, default=None,
                   help="which face to lip-sync when there are several (0 = largest, the default)")
    p.add_argument("--paste", choices=("mouth", "face"), default="mouth",
                   help="region of the generated crop pasted back into the video (default: mouth)")
    p.add_argument("--sample-rate", type=int, default=None,
                   help="sample rate of --audio: required for raw PCM, checked against the file otherwise")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the DiT passes as CUDA graphs")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: 1 for tiny on CPU)")
    p.add_argument("--seed", type=seed_arg, default=0, help="noise seed")
    add_decoder_arg(p)
    p.add_argument("--force", action="store_true", help="run the 1.3b/14b presets on the CPU anyway (hours)")


def _read_raw_pcm(path: str, sample_rate: int | None) -> tuple[np.ndarray, int]:
    if sample_rate is None:
        raise UserError(f"{path}: raw PCM has no header; pass --sample-rate (e.g. --sample-rate 16000), or give a "
                        "wav file")
    data = np.fromfile(path, dtype="<i2")
    if data.size == 0:
        raise UserError(f"{path}: the file is empty")
    return data.astype(np.float32) / 32768.0, sample_rate


def _load_audio(args) -> tuple[np.ndarray, int, str]:
    from lipforcing.media import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, MediaError, read_audio

    if args.sample_rate is not None and not MIN_SAMPLE_RATE <= args.sample_rate <= MAX_SAMPLE_RATE:
        raise UserError(f"--sample-rate {args.sample_rate} is not supported (need {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} "
                        "Hz)")
    src = args.audio if args.audio is not None else args.video
    try:
        if args.audio is not None and args.audio.lower().endswith(_RAW_EXTENSIONS):
            if not os.path.isfile(args.audio):
                raise UserError(f"{args.audio}: no such file (check the --audio path)")
            pcm, rate = _read_raw_pcm(args.audio, args.sample_rate)
        else:
            pcm, rate = read_audio(src)
    except MediaError as exc:
        if args.audio is None and "no audio stream" in str(exc):
            raise UserError(f"{args.video}: the video has no audio track; pass the speech with --audio speech.wav") \
                from exc
        raise UserError(str(exc)) from exc
    if args.sample_rate is not None and rate != args.sample_rate:
        raise UserError(f"{src}: the file's sample rate is {rate} Hz but --sample-rate says {args.sample_rate} Hz; "
                        "drop --sample-rate (the file's own rate is used and resampled to 16 kHz) or fix it")
    if len(pcm) * 25 < rate:   # shorter than one video frame
        raise UserError(f"{src}: the audio is {1e3 * len(pcm) / rate:.1f} ms long, shorter than one video frame "
                        "(40 ms)")
    return pcm, rate, src


def _resample_fps(frames: np.ndarray, fps: float) -> np.ndarray:
    """Nearest-frame conversion of a reference clip to 25 fps (the model's rate)."""
    n_out = max(1, int(round(len(frames) * 25.0 / fps)))
    idx = np.minimum((np.arange(n_out) * fps / 25.0).round().astype(np.int64), len(frames) - 1)
    return frames[idx]


def run(args) -> int:
    from lipforcing.media import MediaError, VideoWriter, check_not_input, check_output_file, read_video
    from lipforcing.profiling import StageTimer, summarize_chunks

    # cheap checks first: files, options, output folder
    if not os.path.exists(args.video):
        raise UserError(f"{args.video}: no such file (check the --video path)")
    if args.audio is not None and not os.path.exists(args.audio):
        raise UserError(f"{args.audio}: no such file (check the --audio path)")
    out = os.path.abspath(args.output)
    try:      # real paths and inodes: a symlink or hard link to an input is the input
        check_not_input(out, {"--video": args.video, "--audio": args.audio, "--checkpoint": args.checkpoint})
    except MediaError as exc:
        raise UserError(str(exc)) from None
    check_output_file(out)
    dev = check_device(args.device)
    check_checkpoint(args.checkpoint)
    check_resolution(args.resolution)
    if args.model not in (None, "tiny") and dev.type == "cpu":
        if not args.force:
            raise UserError(f"--model {args.model} on the CPU would take hours; use a GPU "
                            "(--device cuda), --model tiny, or --force")
        print(f"note: the {args.model} model on the CPU takes many minutes per chunk", file=sys.stderr)
    set_threads(args.threads, args.model or "tiny", dev)

    pcm, rate, audio_src = _load_audio(args)
    n_out = -(-int(round(len(pcm) * 16000 / rate)) // 640)     # about one frame per 40 ms of audio
    try:
        # only the frames the audio covers are needed: read that many at 25 fps, more if the video is faster
        # (full-resolution frames are large: never decode the whole of a long video)
        frames, fps = read_video(args.video, max_frames=n_out + 1)
        need = int(np.ceil(n_out * fps / 25.0)) + 1
        if fps > 25.0 and len(frames) == n_out + 1 and need > len(frames):
            frames, fps = read_video(args.video, max_frames=need)
    except MediaError as exc:
        raise UserError(str(exc)) from exc
    if args.face_index is not None and args.face_index < 0:
        raise UserError(f"--face-index {args.face_index}: must be >= 0 (0 = the largest face)")

    engine, load_s = load_engine(model=args.model, checkpoint=args.checkpoint, device=dev, dtype=args.dtype,
                                 seed=0, resolution=args.resolution, cuda_graphs=args.cuda_graphs, debug=args.debug,
                                 decoder=args.decoder, vae=args.vae, audio_encoder=args.audio_encoder,
                                 text=args.text, mask=args.mask)
    H, W = frames.shape[1:3]                  # the output keeps the video's resolution
    if H % 2 or W % 2:                        # H.264 yuv420p needs even sizes: repeat the last row / column
        print(f"note: {args.video} is {W}x{H}; the output is padded to {W + W % 2}x{H + H % 2} (H.264 needs even "
              "sizes)", file=sys.stderr)
    if abs(fps - 25.0) > 0.01:
        print(f"note: {args.video} is {fps:.3g} fps; its frames are resampled to the model's 25 fps", file=sys.stderr)
        frames = _resample_fps(frames, fps)
    from lipforcing.face import FaceError

    t = time.perf_counter()
    try:     # the face stage (detection, tracking, alignment of the whole video) runs here, before any output
        session = engine.session(frames, sample_rate=rate, seed=args.seed, face_index=args.face_index,
                                 region=args.paste)
    except FaceError as exc:
        hint = ""
        if H == W and H % 16 == 0 and args.resolution is None:
            hint = f"; if the video is aligned face crops, pass --resolution {H}"
        raise UserError(f"{args.video}: {exc}{hint}") from exc
    from lipforcing.cli.demo import weights_message

    print(weights_message("lipforcing sync", engine, args.checkpoint, args.model), file=sys.stderr)
    if session.face is not None:
        print(f"face: tracked in {int(session.face.track.found.sum())} of {len(frames)} frames of {W}x{H} "
              f"({1e3 * (time.perf_counter() - t) / len(frames):.1f} ms per frame)", file=sys.stderr)
    timer = StageTimer(engine.device)
    engine.stage = timer
    piece = max(1, rate // 50)                                    # 20 ms
    first_frame_s = None
    try:
        writer = VideoWriter(out, width=W + W % 2, height=H + H % 2, fps=25, sample_rate=16000)
    except (MediaError, ValueError) as exc:
        session.close()
        del engine.stage
        raise UserError(str(exc) if isinstance(exc, MediaError) else f"-o {args.output}: {exc}") from exc

    t0 = time.perf_counter()
    try:
        with writing_video(writer, n_out), progress(n_out, "sync") as bar, session:
            def drain():
                nonlocal first_frame_s
                for frame in session.frames():
                    if first_frame_s is None:
                        first_frame_s = time.perf_counter() - t0
                    image = frame.image
                    if H % 2 or W % 2:
                        image = np.pad(image, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge")
                    writer.write(image, audio=frame.audio)
                    bar.update(1)

            for i in range(0, len(pcm), piece):
                session.push_audio(pcm[i:i + piece])
                drain()
            session.end_of_speech()
            drain()
    finally:                        # completed: writing_video closed the writer (out.partial.mp4 -> out.mp4)
        del engine.stage
    wall = time.perf_counter() - t0
    chunks = timer.chunks()
    summary = summarize_chunks(engine, chunks) if chunks else None

    print(f"wrote {args.output}: {writer.frames} frames ({writer.frames / 25:.2f} s at 25 fps, {W}x{H}) with "
          f"{writer.samples / 16000:.2f} s of 16 kHz audio from {audio_src} ({rate} Hz)")
    print(f"  {writer.frames / wall:.1f} FPS ({wall:.2f} s wall, decoding excluded, encoding included), time to first "
          f"frame {first_frame_s if first_frame_s is not None else float('nan'):.3f} s, engine load {load_s:.2f} s")
    if summary:
        lat = summary["chunk_latency_ms"]
        stages = ", ".join(f"{k} {v['mean_ms_per_chunk']:.1f}" for k, v in summary["stages"].items())
        print(f"  {len(chunks)} chunks: latency p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f}, p99 {lat['p99']:.1f}; "
              f"ms per chunk: {stages}")
    return 0
