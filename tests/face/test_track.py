"""Tracking on moving clips: found in every frame, the crop follows the face, no jitter on a still face, the larger of
two faces is chosen and kept, faceless frames and scene cuts, errors for clips without a usable face."""
import numpy as np
import pytest

from lipforcing.face import FaceError, FacePipeline, FaceTracker
from lipforcing.face.align import invert
from lipforcing.face.track import OneEuro, track_clip
from tests.face.helpers import (apply, astronaut, background, clip, compose, corner_points, fresh_rng, placement,
                                procedural_face, render)

R = 256


def crop_drift(track, Gs) -> np.ndarray:
    """How far (crop pixels) the source picture moves inside the crop relative to frame 0, per frame: the map
    source -> crop is M_t o G_t; a perfect tracker keeps it constant."""
    P = [compose(track.matrices[i], Gs[i]) for i in range(len(Gs))]
    back = invert(P[0])
    pts = corner_points(R, R)
    return np.array([np.abs(apply(compose(p, back), pts) - pts).max() for p in P])


@pytest.mark.parametrize("size", [(720, 1280), (1280, 720)])
@pytest.mark.parametrize("kind", ["astronaut", "procedural"])
def test_moving_face_found_and_followed(kind, size):
    rng, seed = fresh_rng()
    src = astronaut() if kind == "astronaut" else procedural_face()
    H, W = size
    s0 = rng.uniform(1.2, 1.6)
    start = (rng.uniform(0.3, 0.4) * W, rng.uniform(0.35, 0.45) * H)
    end = (start[0] + rng.uniform(0.05, 0.15) * W, start[1] + rng.uniform(-0.05, 0.05) * H)
    frames, Gs, _ = clip(src, size, 6, rng, start=start, end=end, scale=(s0, s0 * 1.15), angle=(-6, 6))
    track = FacePipeline((R, R), smoothing=False).track(frames)
    assert track.found.all(), seed
    assert np.isfinite(track.matrices).all()
    drift = crop_drift(track, Gs)
    assert drift.max() < 0.05 * R, (seed, drift)          # the face stays put in the crop (landmark noise only)
    smooth = FacePipeline((R, R)).track(frames)
    assert crop_drift(smooth, Gs).max() < 0.08 * R, seed  # smoothing lags a little behind a moving face


def test_still_face_does_not_jitter():
    """A still face under sensor noise: the crop's corners move less than 1 px (frame pixels) between frames."""
    rng, seed = fresh_rng()
    frames, _, _ = clip(astronaut(), (720, 1280), 8, rng, start=(640, 360), end=(640, 360), scale=(1.5, 1.5))
    frames = np.clip(frames + rng.integers(-4, 5, frames.shape), 0, 255).astype(np.uint8)
    track = FacePipeline((R, R)).track(frames)
    assert track.found.all()
    corners = np.stack([apply(invert(m), corner_points(R, R)) for m in track.matrices])
    jitter = np.abs(np.diff(corners, axis=0)).max()
    assert jitter < 1.0, (seed, jitter)


def test_one_euro_filter():
    f = OneEuro(25.0)
    assert np.array_equal(f(np.array([3.0, -1.0])), [3.0, -1.0])     # first value passes through
    rng, _ = fresh_rng()
    # values in pixels of a 100-pixel face: 0.05 px noise on a still face is damped (to about 0.4x) ...
    noisy = [f(np.array([3.0, -1.0]) + rng.normal(0, 0.05, 2), scale=100.0) for _ in range(300)]
    assert np.std(noisy[50:], axis=0).max() < 0.6 * 0.05
    f.reset()
    # ... while a steady move of 10 px per frame (2.5 faces per second) is followed within 1.5 px
    ramp = [f(np.array([10.0 * i]), scale=100.0) for i in range(60)]
    assert abs(ramp[-1][0] - 590.0) < 1.5


def test_two_faces_larger_chosen_and_kept():
    """The larger face is chosen in frame 0 and followed even after the other one grows larger; face_index and box
    choose the other one."""
    rng, seed = fresh_rng()
    a, p = astronaut(), procedural_face()
    H, W = 720, 1280
    bg = background(H, W, rng)
    frames, G_a, G_p = [], [], []
    for i in range(6):
        ga = placement(a.shape, (380, 360), 2.0 - 0.1 * i, 0)          # face 190 px, shrinks to 143
        gp = placement(p.shape, (960, 360), 0.9 + 0.12 * i, 0)          # face 130 px, grows past it to 217
        frames.append(render(p, render(a, bg, ga), gp))
        G_a.append(ga)
        G_p.append(gp)
    frames = np.stack(frames)
    track = FacePipeline((R, R), smoothing=False).track(frames)
    assert track.found.all()
    centres = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    assert (centres < 640).all(), (seed, centres)                        # the astronaut all along
    other = FacePipeline((R, R), face_index=1, smoothing=False).track(frames)
    assert ((other.boxes[:, 0] + other.boxes[:, 2]) / 2 > 640).all()
    boxed = FacePipeline((R, R), box=(800, 200, 1120, 520), smoothing=False).track(frames)
    assert ((boxed.boxes[:, 0] + boxed.boxes[:, 2]) / 2 > 640).all()


def test_faceless_frames_and_scene_cut():
    """Frames without the face are marked not found (their matrix borrowed from a neighbour); after a cut to a new
    background with the face elsewhere, the first frame is aligned at once (no smoothing across the cut)."""
    rng, seed = fresh_rng()
    src = astronaut()
    f1, _, bg1 = clip(src, (720, 1280), 4, rng, start=(400, 360), end=(410, 360), scale=(1.5, 1.5))
    f2, _, _ = clip(src, (720, 1280), 4, rng, start=(900, 300), end=(905, 300), scale=(1.8, 1.8))
    frames = np.concatenate([f1, bg1[None], f2])
    track = FacePipeline((R, R)).track(frames)
    assert track.found.tolist() == [True] * 4 + [False] + [True] * 4
    np.testing.assert_array_equal(track.matrices[4], track.matrices[3])
    # after the cut: the crop holds the face as in an unsmoothed alignment of that frame
    alone = FacePipeline((R, R), smoothing=False).track(f2[:1])
    ours = apply(invert(track.matrices[5]), corner_points(R, R))
    ref = apply(invert(alone.matrices[0]), corner_points(R, R))
    assert np.abs(ours - ref).max() < 2.0, seed


def test_no_face_and_too_small_errors():
    rng, _ = fresh_rng()
    with pytest.raises(FaceError, match="no face found in any of the 3 frames"):
        FacePipeline((R, R)).track(np.stack([background(360, 640, rng)] * 3))
    small = render(procedural_face(), background(240, 320, rng), placement((240, 240), (160, 120), 0.25, 0))
    with pytest.raises(FaceError, match=r"too small to align: \d+ px, need at least 48 px"):
        FacePipeline((R, R)).track(small[None])


def test_tracker_argument_errors():
    with pytest.raises(ValueError, match="face_index"):
        FaceTracker(face_index=-1)
    with pytest.raises(ValueError, match="box"):
        FaceTracker(box=(10, 10, 5, 20))
    with pytest.raises(ValueError, match="not both"):
        FaceTracker(face_index=0, box=(0, 0, 1, 1))
    with pytest.raises(ValueError, match="uint8"):
        FacePipeline((R, R)).track(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(FaceError):
        track_clip(np.zeros((1, 64, 64, 3), np.uint8), FaceTracker((R, R)))


def test_scene_cut_alone_restarts_the_smoothing():
    """A cut with the face present on both sides (same place, new background, no faceless frame between): the
    first frame after the cut gets the unsmoothed alignment exactly (the filter restarted), while a frame
    without a cut is smoothed (the filter's history differs from that frame's own landmarks)."""
    rng, seed = fresh_rng()
    src = astronaut()
    H, W = 720, 1280
    centre = (rng.uniform(500, 780), rng.uniform(300, 420))
    G = [placement(src.shape, (centre[0] + 2 * i, centre[1]), 1.5, 0.0) for i in range(5)]
    dark = np.clip(rng.uniform(20, 70, 3) + rng.normal(0, 2, (H, W, 3)), 0, 255).astype(np.uint8)
    bright = np.clip(rng.uniform(180, 230, 3) + rng.normal(0, 2, (H, W, 3)), 0, 255).astype(np.uint8)
    frames = np.stack([render(src, dark if i < 3 else bright, G[i]) for i in range(5)])   # the cut: 2 -> 3
    raw = [FacePipeline((R, R), smoothing=False).track(frames[i:i + 1]).matrices[0] for i in range(5)]
    tracker = FaceTracker((R, R))
    got = [tracker.update(f) for f in frames]
    assert all(g is not None for g in got), seed
    np.testing.assert_allclose(got[0][0], raw[0], atol=1e-9)            # the first frame of a track: unsmoothed
    np.testing.assert_allclose(got[3][0], raw[3], atol=1e-9, err_msg=str(seed))   # the first frame after the cut
    assert np.abs(got[2][0] - raw[2]).max() > 1e-6, seed               # within a shot the filter smooths
