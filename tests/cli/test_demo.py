"""`lipforcing demo` writes a playable mp4 with audio and says the model is untrained."""
import av
import numpy as np
import pytest

from lipforcing.cli import main


def test_demo_writes_a_playable_mp4(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "-o", str(out), "--seconds", "1.0"]) == 0
    with av.open(str(out)) as c:
        assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
        v, a = c.streams.video[0], c.streams.audio[0]
        assert float(v.average_rate) == 25.0 and a.rate == 16000
        assert float(a.duration * a.time_base) == pytest_approx(1.0)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    assert len(frames) == 25
    assert frames[0].shape == (360, 2 * 640, 3)                  # input | output side by side, 640x360 each
    assert np.stack(frames).std() > 1
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text and "NOT real lip sync" in text
    hint = text[text.index("For real output"):].splitlines()[0]       # a 1.3B run needs all four real parts
    assert all(flag in hint for flag in ("--checkpoint", "--vae", "--audio-encoder", "--text"))
    assert "FPS" in text and "time to first frame" in text and "vae_decode" in text


def pytest_approx(x):
    import pytest

    return pytest.approx(x, abs=0.07)


def test_demo_option_errors(tmp_path, capsys):
    assert main(["demo", "-o", str(tmp_path / "missing" / "demo.mp4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "Traceback" not in err
    assert main(["demo", "--seconds", "0"]) == 2
    assert "--seconds" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["-o", "{d}/demo.gif"], ".mp4"),             # was a PyAV traceback after the warm-up
    (["-o", "{d}"], ".mp4"),                      # a folder
    (["-o", "{d}/" + "n" * 300 + ".mp4"], "cannot create the output file"),
    (["--resolution", "40"], "--resolution"),
    (["--device", "tpu"], "--device"),
])
def test_demo_more_option_errors(tmp_path, capsys, argv, needle):
    argv = [a.format(d=tmp_path) for a in argv]
    if "-o" not in argv:
        argv += ["-o", str(tmp_path / "demo.mp4")]
    assert main(["demo", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lipforcing demo: error:") and needle in err[0], err
    assert "Traceback" not in captured.err and "RANDOM WEIGHTS" not in captured.out   # refused before any work
    assert list(tmp_path.iterdir()) == []


def test_demo_negative_seed_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--seed", "-1"])
    assert exc.value.code == 2 and "--seed" in capsys.readouterr().err
