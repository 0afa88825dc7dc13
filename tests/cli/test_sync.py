"""`lipforcing sync`: a generated face video + wav round-trip to an mp4 (read back with PyAV), and its errors."""
import math

import av
import numpy as np
import pytest

from lipforcing.cli import UserError, main
from tests.cli.helpers import make_video, make_wav


def _read_back(path):
    with av.open(str(path)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        fps = float(v.average_rate)
        rate = a.rate
        audio_s = float(a.duration * a.time_base)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    return frames, fps, rate, audio_s


def test_round_trip(tmp_path, capsys, _fresh_random_inputs):
    seed = _fresh_random_inputs
    video, wav, out = tmp_path / "face.mp4", tmp_path / "speech.wav", tmp_path / "out.mp4"
    make_video(video, 20, 32, seed=seed)                 # shorter than the speech: the session ping-pongs it
    seconds, rate = 1.3, 22050                           # not 16 kHz: the session resamples
    make_wav(wav, seconds, rate, seed=seed)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"]) == 0
    frames, fps, out_rate, audio_s = _read_back(out)
    n = math.ceil(seconds * 25)                          # one frame per 40 ms of audio, a partial last one counts
    assert len(frames) == n
    assert frames[0].shape == (32, 32, 3)
    assert fps == 25.0 and out_rate == 16000
    assert audio_s == pytest.approx(n * 0.04, abs=0.07)  # each frame carries its 640 samples (AAC framing slack)
    assert audio_s == pytest.approx(seconds, abs=0.07)
    assert np.std(np.stack(frames).astype(np.float32)) > 0
    out_text = capsys.readouterr().out
    assert f"{n} frames" in out_text and "FPS" in out_text and "time to first frame" in out_text


def test_uses_the_video_audio_track(tmp_path, _fresh_random_inputs):
    from lipforcing.media import synthetic_speech

    pcm = synthetic_speech(0.5, 16000, seed=_fresh_random_inputs)
    video, out = tmp_path / "talk.mp4", tmp_path / "out.mp4"
    make_video(video, 12, 32, audio=pcm, seed=_fresh_random_inputs)
    assert main(["sync", "--video", str(video), "-o", str(out), "--device", "cpu"]) == 0
    frames, fps, _, audio_s = _read_back(out)
    assert abs(len(frames) - 0.5 * 25) <= 2 and fps == 25.0      # AAC priming/padding may add a frame's worth


@pytest.fixture
def files(tmp_path, _fresh_random_inputs):
    seed = _fresh_random_inputs
    make_video(tmp_path / "face.mp4", 4, 32, seed=seed)
    make_video(tmp_path / "face48.mp4", 4, 48, seed=seed)
    make_video(tmp_path / "mute.mp4", 4, 32, seed=seed)
    make_wav(tmp_path / "speech.wav", 0.3, 16000, seed=seed)
    make_wav(tmp_path / "low.wav", 0.3, 4000, seed=seed)
    make_wav(tmp_path / "blip.wav", 0.01, 16000, seed=seed)
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 10)
    (tmp_path / "folder.mp4").mkdir()
    return tmp_path


CASES = [
    (["--video", "{d}/missing.mp4", "--audio", "{d}/speech.wav"], ["missing.mp4", "no such file"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/missing.wav"], ["missing.wav", "no such file"]),
    (["--video", "{d}/junk.mp4", "--audio", "{d}/speech.wav"], ["junk.mp4", "cannot decode"]),
    (["--video", "{d}/speech.wav", "--audio", "{d}/speech.wav"], ["no video stream"]),
    (["--video", "{d}/face48.mp4", "--audio", "{d}/speech.wav"], ["48x48", "32x32", "--resolution 48"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "--sample-rate", "44100"],
     ["16000 Hz", "--sample-rate says 44100"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/low.wav"], ["4000 Hz", "not supported"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/blip.wav"], ["shorter than one video frame"]),
    (["--video", "{d}/mute.mp4"], ["no audio track", "--audio"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "-o", "{d}/nodir/out.mp4"], ["does not exist"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "-o", "{d}/out.gif"], [".mp4"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "-o", "{d}/folder.mp4"], [".mp4"]),   # a folder
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "--resolution", "40"],
     ["--resolution", "multiples of 16", "40"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "--resolution", "-32"],
     ["--resolution", "multiples of 16", "-32"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "--model", "1.3b"], ["--model 1.3b", "--force"]),
    (["--video", "{d}/face.mp4", "--audio", "{d}/speech.wav", "-o", "{d}/" + "n" * 300 + ".mp4"],
     ["cannot create the output file"]),
]


@pytest.mark.parametrize("argv,needles", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_errors_are_one_line(files, capsys, argv, needles):
    argv = [a.format(d=files) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(files / "out.mp4")]
    assert main(["sync", *argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("lipforcing.Engine")]   # the engine's own log line
    assert len(err) == 1, err
    assert err[0].startswith("lipforcing sync: error:") and "Traceback" not in err[0]
    for n in needles:
        assert n in err[0], (n, err[0])


def test_debug_shows_the_exception(files):
    with pytest.raises(UserError):
        main(["--debug", "sync", "--video", str(files / "missing.mp4"), "--audio", str(files / "speech.wav"), "-o",
              str(files / "out.mp4")])


def test_debug_after_the_subcommand(files):
    with pytest.raises(UserError, match="no such file"):
        main(["sync", "--video", str(files / "missing.mp4"), "--audio", str(files / "speech.wav"), "-o",
              str(files / "out.mp4"), "--debug"])


@pytest.mark.parametrize("seed", ["-1", str(1 << 64), "x"])
def test_seed_out_of_range_is_an_argument_error(files, capsys, seed):
    with pytest.raises(SystemExit) as exc:
        main(["sync", "--video", str(files / "face.mp4"), "--audio", str(files / "speech.wav"), "-o",
              str(files / "out.mp4"), "--seed", seed])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--seed" in err and "Traceback" not in err
