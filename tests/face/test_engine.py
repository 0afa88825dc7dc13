"""The engine on real videos: full frames in, full frames out (mouth pasted back, everything else untouched),
aligned crops still work, faceless frames pass through, prepared references reload without detection."""
import numpy as np
import pytest
import torch

import lipforcing
from lipforcing.face import FaceError, pingpong_index
from lipforcing.face.paste import paste_back
from tests.face.helpers import astronaut, background, clip, fresh_rng

pytest.importorskip("cv2")

P = 640


@pytest.fixture(scope="module")
def engine():
    e = lipforcing.Engine.load(model="tiny", seed=0, backend="reference")     # 32x32 crops
    yield e
    e.close()


def run(session, seconds: float, seed: int = 0):
    pcm = np.random.default_rng(seed).normal(0, 0.1, int(seconds * 16000)).astype(np.float32)
    session.push_audio(pcm)
    session.end_of_speech()
    return list(session.frames())


def blend_region(session, i, shape):
    """Frame pixels the paste-back may change for reference frame i (positive blend weight)."""
    fp, track = session.face.pipeline, session.face.track
    hit = paste_back(torch.zeros(*shape, dtype=torch.uint8), torch.full(fp.resolution + (3,), 255.0),
                     track.matrices[i], (fp.weight > 0).float())
    return hit[..., 0].numpy() > 0


def test_full_frames_in_full_frames_out(engine):
    rng, seed = fresh_rng()
    frames, _, bg = clip(astronaut(), (360, 640), 6, rng, start=(280, 170), end=(300, 180), scale=(1.0, 1.05))
    frames[4] = bg                                                       # the face leaves for a frame
    s = engine.session(frames)
    assert s.face is not None and s.face.track.found.tolist() == [True] * 4 + [False, True]
    out = run(s, 0.6)
    s.close()
    assert len(out) == 15
    changed_somewhere = False
    for f in out:
        i = pingpong_index(f.index, len(frames))
        assert f.image.shape == (360, 640, 3) and f.image.dtype == np.uint8
        assert f.face.shape == (32, 32, 3)
        if i == 4:
            assert np.array_equal(f.image, frames[4]), seed              # faceless: bit-exact
            continue
        region = blend_region(s, i, (360, 640, 3))
        assert np.array_equal(f.image[~region], frames[i][~region]), seed   # outside the blend: bit-exact
        changed_somewhere |= bool((f.image[region] != frames[i][region]).any())
    assert changed_somewhere                                             # the generated mouth is pasted in


def test_aligned_crops_still_work(engine):
    rng, _ = fresh_rng()
    crops = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    s = engine.session(crops)
    assert s.face is None
    out = run(s, 0.2)
    s.close()
    assert out and all(f.image.shape == (32, 32, 3) and np.array_equal(f.face, f.image) for f in out)
    with pytest.raises(ValueError, match="aligned=True but the reference frames are 64x48"):
        engine.session(np.zeros((2, 48, 64, 3), np.uint8), aligned=True)
    with pytest.raises(FaceError, match="no face found"):
        engine.session(crops, aligned=False)                            # detect anyway: random pixels have none


def test_no_face_fails_before_generation(engine):
    rng, _ = fresh_rng()
    with pytest.raises(FaceError, match=r"no face found in any of the 2 frames \(640x360\).*32x32"):
        engine.session(np.stack([background(360, 640, rng)] * 2))
    with pytest.raises(TypeError, match="aligned must be"):
        engine.session(np.zeros((1, 32, 32, 3), np.uint8), aligned="yes")


def test_prepared_reference_reloads_without_detection(engine, tmp_path, monkeypatch):
    rng, seed = fresh_rng()
    frames, _, _ = clip(astronaut(), (240, 320), 4, rng, start=(150, 120), end=(160, 125), scale=(0.8, 0.8))
    path = tmp_path / "avatar.safetensors"
    ref = engine.prepare(frames, path)
    first = run(engine.session(ref), 0.3)
    import lipforcing.face.detect as detect

    monkeypatch.setattr(detect, "detect_faces", lambda *a, **k: pytest.fail("detection ran on a prepared reference"))
    s = engine.session(str(path))
    np.testing.assert_array_equal(s.face.track.matrices, ref.face.track.matrices)
    again = run(s, 0.3)
    s.close()
    assert [f.index for f in first] == [f.index for f in again]
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.face, b.face), seed
    other = lipforcing.Engine.load(model="tiny", seed=0, backend="reference", resolution=48)
    with pytest.raises(ValueError, match="prepared for 32x32 crops but this engine uses 48x48"):
        other.session(str(path))
    other.close()
    with pytest.raises(ValueError, match="aligned crops"):
        engine.prepare(np.zeros((1, 32, 32, 3), np.uint8), tmp_path / "x.safetensors")


def test_prepared_video_reference_checks_its_source(engine, tmp_path):
    av = pytest.importorskip("av")
    from lipforcing.media import VideoWriter

    rng, _ = fresh_rng()
    frames, _, _ = clip(astronaut(), (240, 320), 3, rng, start=(150, 120), end=(155, 120), scale=(0.8, 0.8))
    video = tmp_path / "ref.mp4"
    with VideoWriter(video, width=320, height=240, fps=25, sample_rate=None) as w:
        for f in frames:
            w.write(f)
    path = tmp_path / "ref.safetensors"
    engine.prepare(str(video), path)
    assert path.stat().st_size < 10_000                                 # the frames stay in the video
    s = engine.session(path)
    assert s.reference.shape == (3, 240, 320, 3)
    s.close()
    video.write_bytes(video.read_bytes() + b"\0")
    with pytest.raises(ValueError, match="changed since it was prepared"):
        engine.session(path)
    assert av is not None


def test_engine_mask_image(tmp_path):
    cv2 = pytest.importorskip("cv2")
    keep = np.full((64, 64), 255, np.uint8)
    keep[40:, 8:56] = 0
    cv2.imwrite(str(tmp_path / "mask.png"), keep)
    e = lipforcing.Engine.load(model="tiny", seed=0, backend="reference", mask=str(tmp_path / "mask.png"))
    assert e.mouth_mask.shape == (32, 32) and e.mouth_mask[25, 16] and not e.mouth_mask[5, 16]
    e.close()
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode it as an image"):
        lipforcing.Engine.load(model="tiny", seed=0, backend="reference", mask=str(tmp_path / "bad.png"))
