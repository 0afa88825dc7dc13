"""`lipforcing sync` on an ordinary 1280x720 video: the output keeps 1280x720 and every pixel outside the face's
blend box matches the input; options of the face stage and its errors."""
import av
import numpy as np
import pytest
import torch

from lipforcing.cli import main
from lipforcing.face import FacePipeline
from lipforcing.face.paste import paste_back
from lipforcing.media import VideoWriter, read_video
from tests.cli.helpers import make_wav

pytest.importorskip("cv2")
face_helpers = pytest.importorskip("tests.face.helpers")


def psnr(a, b) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_sync_720p_keeps_resolution_and_background(tmp_path, capsys):
    rng, seed = face_helpers.fresh_rng()
    frames, _, _ = face_helpers.clip(face_helpers.astronaut(), (720, 1280), 12, rng, start=(520, 330),
                                     end=(560, 350), scale=(1.8, 1.9), angle=(-3, 3))
    video, wav, out = tmp_path / "talk.mp4", tmp_path / "speech.wav", tmp_path / "out.mp4"
    with VideoWriter(video, width=1280, height=720, fps=25, sample_rate=None) as w:
        for f in frames:
            w.write(f)
    make_wav(wav, 0.4, 16000, seed=seed)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"]) == 0
    assert "1280x720" in capsys.readouterr().out
    src, _ = read_video(video)                      # what the command read (H.264-decoded)
    got, fps = read_video(out)
    assert fps == 25.0 and got.shape == (10, 720, 1280, 3), got.shape
    # The face box: every pixel the paste-back may touch in any frame (the same face stage on the same decoded
    # frames: the tiny engine's 32x32 crop and default mouth mask), grown by 16 px for H.264's blocks.  Both files
    # are H.264 (crf 18, yuv420p), so "equal" outside it means: within the error of re-encoding the input itself
    # (the command copies those pixels bit-exactly from the decoded input; tests/face checks the bit-exactness).
    fp = FacePipeline((32, 32))
    track = fp.track(src[:10])
    hit = np.zeros((720, 1280), bool)
    for i in range(10):
        hit |= paste_back(torch.zeros(720, 1280, 3, dtype=torch.uint8), torch.full((32, 32, 3), 255.0),
                          track.matrices[i], (fp.weight > 0).float())[..., 0].numpy() > 0
    ys, xs = np.nonzero(hit)
    assert len(ys) > 500
    box = np.zeros_like(hit)
    pad = 16
    box[max(ys.min() - pad, 0):ys.max() + pad, max(xs.min() - pad, 0):xs.max() + pad] = True
    assert box.mean() < 0.1                                           # a face-sized box, not the frame
    outside = got[:, ~box]
    assert psnr(outside, src[:10, ~box]) > 40, seed
    # control: the input re-encoded the same way; outside the box the output is no further from the input than that
    control = tmp_path / "control.mp4"
    with VideoWriter(control, width=1280, height=720, fps=25, sample_rate=None) as w:
        for f in src[:10]:
            w.write(f)
    ctrl = read_video(control)[0]
    err = np.abs(outside.astype(np.int16) - src[:10, ~box]).astype(np.float64)
    ctrl_err = np.abs(ctrl[:, ~box].astype(np.int16) - src[:10, ~box]).astype(np.float64)
    assert err.mean() <= 1.2 * ctrl_err.mean() + 0.05, (seed, err.mean(), ctrl_err.mean())
    assert np.percentile(err, 99.9) <= np.percentile(ctrl_err, 99.9) + 2, seed
    inside = psnr(got[:, hit], src[:10, hit])
    assert inside < 35, inside                    # the regenerated (random-weight) mouth: the checks above can fail


def test_sync_face_errors(tmp_path, capsys):
    rng, _ = face_helpers.fresh_rng()
    bg = face_helpers.background(180, 320, rng)
    video, wav = tmp_path / "empty.mp4", tmp_path / "speech.wav"
    with VideoWriter(video, width=320, height=180, fps=25, sample_rate=None) as w:
        for _ in range(3):
            w.write(bg)
    make_wav(wav, 0.3, 16000)
    argv = ["sync", "--video", str(video), "--audio", str(wav), "-o", str(tmp_path / "out.mp4"), "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no face found in any of the 3 frames" in err and "Traceback" not in err
    assert not (tmp_path / "out.mp4").exists()                        # refused before any output
    assert main(argv[:-2] + ["--mask", str(tmp_path / "nope.png"), "--device", "cpu"]) == 2
    assert "--mask" in capsys.readouterr().err
    assert main(argv[:-2] + ["--face-index", "-1", "--device", "cpu"]) == 2
    assert "--face-index -1" in capsys.readouterr().err
    with av.open(str(video)) as c:
        assert c.streams.video[0].codec_context.width == 320


@pytest.mark.parametrize("fps", [50, 12])
def test_sync_other_frame_rates(tmp_path, capsys, fps):
    """Only the frames the audio needs are decoded, also for videos faster than 25 fps (read again when short)."""
    from tests.cli.helpers import make_video

    video, wav, out = tmp_path / "v.mp4", tmp_path / "s.wav", tmp_path / "o.mp4"
    make_video(video, 40, 32, fps=fps)                # aligned 32x32 crops: no face stage
    make_wav(wav, 0.4, 16000)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"]) == 0
    assert f"is {fps} fps" in capsys.readouterr().err
    got, out_fps = read_video(out)
    assert out_fps == 25.0 and len(got) == 10
