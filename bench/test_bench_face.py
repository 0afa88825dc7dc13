"""The face stage per 1280x720 frame on the CPU (1 thread): detection, landmarks, tracking, alignment, paste-back.

A procedural face (320 px) moves 3 px per frame in a 1280x720 frame; crops are 512x512 (the real presets').
Rows (pytest-benchmark, ms per frame):

* ``detect``: BlazeFace on the letterboxed frame + square tiles (runs on the first frame, after a lost face and
  after a scene cut only); ``landmarks``: one Face Mesh call; ``track``: everything the tracker does per frame
  over a 20-frame clip (landmarks, ROI re-centring, scene-cut thumbnail, One-Euro smoothing; one detection);
* ``align`` (torch, bicubic, footprint only) next to its baseline ``align_cv2`` (``cv2.warpAffine`` bicubic of the
  same crop), ratio printed;
* ``paste_mouth`` / ``paste_face`` (torch, blend region's footprint only) next to the LatentSync-style baseline
  ``paste_cv2_full_frame`` (inverse ``cv2.warpAffine`` of crop and mask to the whole frame + a float blend of the
  whole frame), ratio printed;
* with a CUDA GPU also ``align_cuda``, ``paste_mouth_cuda``, ``paste_face_cuda``: the same torch code with frame,
  crop and weight on the GPU (synchronised after each call; detection and landmarks stay on the CPU: OpenCV).

Run: ``pytest bench/test_bench_face.py`` (add ``--benchmark-disable`` for one pass).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

cv2 = pytest.importorskip("cv2")

from lipforcing.face import FacePipeline, detect, landmarks  # noqa: E402
from lipforcing.face.align import invert, warp_to_crop  # noqa: E402
from lipforcing.media import synthetic_face_clip  # noqa: E402

H, W, R, N = 720, 1280, 512, 20
_ms: dict = {}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                reason="needs a CUDA GPU"))]


def _on(device, fn, *args):
    """``fn(*args)``, followed by a synchronisation on CUDA (so the benchmark times the kernels)."""
    if device != "cuda":
        return lambda: fn(*args)

    def run():
        out = fn(*args)
        torch.cuda.synchronize()
        return out
    return run


def _name(base, device):
    return base if device == "cpu" else f"{base}_{device}"


@pytest.fixture(scope="module")
def scene():
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    faces = synthetic_face_clip(N, 320, seed=0)
    frames = np.empty((N, H, W, 3), np.uint8)
    frames[:] = np.linspace(60, 140, W).astype(np.uint8)[None, :, None]
    for i in range(N):
        frames[i, 200:520, 480 + 3 * i:800 + 3 * i] = faces[i]
    fp = FacePipeline((R, R))
    track = fp.track(frames)
    crops = fp.crops(frames, track)
    return frames, fp, track, crops


def _record(benchmark, name, per=1):
    _ms[name] = benchmark.stats.stats.median * 1e3 / per
    benchmark.extra_info["ms_per_frame"] = _ms[name]


def test_detect(benchmark, scene):
    frames = scene[0]
    benchmark(detect.detect_faces, frames[0])
    _record(benchmark, "detect")


def test_landmarks(benchmark, scene):
    frames = scene[0]
    roi = landmarks.roi_from_detection(detect.detect_faces(frames[0])[0])
    benchmark(landmarks.face_landmarks, frames[1], roi)
    _record(benchmark, "landmarks")


def test_track(benchmark, scene):
    frames, fp = scene[0], scene[1]
    benchmark.pedantic(fp.track, args=(frames,), rounds=3, iterations=1)
    _record(benchmark, "track", per=N)


def test_align_cv2(benchmark, scene):
    frames, _, track, _ = scene
    M = track.matrices[5].copy()
    M[:, 2] += M[:, :2] @ [0.5, 0.5] - 0.5              # cv2's pixel-centre convention
    benchmark(cv2.warpAffine, frames[5], M, (R, R), flags=cv2.INTER_CUBIC)
    _record(benchmark, "align_cv2")


@pytest.mark.parametrize("device", DEVICES)
def test_align(benchmark, scene, device):
    frames, _, track, _ = scene
    f = torch.from_numpy(frames[5:6]).to(device)
    benchmark(_on(device, warp_to_crop, f, track.matrices[5:6], (R, R)))
    name = _name("align", device)
    _record(benchmark, name)
    print(f"\n{name}: {_ms[name]:.2f} ms per frame, {_ms[name] / _ms['align_cv2']:.2f}x cv2.warpAffine (CPU)")


def test_paste_cv2_full_frame(benchmark, scene):
    frames, fp, track, crops = scene
    inv = invert(track.matrices[5])
    inv[:, 2] += inv[:, :2] @ [0.5, 0.5] - 0.5
    crop, weight = crops[5].numpy(), fp.weight.numpy()

    def paste():
        warped = cv2.warpAffine(crop, inv, (W, H)).astype(np.float32)
        a = cv2.warpAffine(weight, inv, (W, H))[..., None]
        return (frames[5] * (1 - a) + warped * a).round().astype(np.uint8)

    benchmark(paste)
    _record(benchmark, "paste_cv2_full_frame")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("region", ["mouth", "face"])
def test_paste(benchmark, scene, region, device):
    frames, fp, track, crops = scene
    p = fp if region == "mouth" and device == "cpu" else FacePipeline((R, R), region=region, device=device)
    f, crop = torch.from_numpy(frames[5]).to(device), crops[5].to(device)
    benchmark(_on(device, p.paste, f, crop, track, 5))
    name = _name(f"paste_{region}", device)
    _record(benchmark, name)
    print(f"\n{name}: {_ms[name]:.2f} ms per frame, {_ms[name] / _ms['paste_cv2_full_frame']:.2f}x the full-frame "
          "cv2 baseline (CPU)")
