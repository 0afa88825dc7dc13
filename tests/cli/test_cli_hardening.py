"""Command-line hardening (issue 13): --version, --help without torch, outputs that alias an input refused,
Ctrl-C / SIGTERM keep a playable partial file and exit 130 with one line, defaults agree across commands, and
library errors reach the user as one line with exit 2."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from lipforcing.cli import EXIT_INTERRUPTED, EXIT_USAGE, SUBCOMMANDS, build_parser, main
from lipforcing.media import VideoWriter, read_video
from tests.cli.helpers import make_video, make_wav


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    import lipforcing

    assert capsys.readouterr().out.strip() == f"lipforcing {lipforcing.__version__}"


def test_help_does_not_import_torch():
    """`lipforcing --help` and every subcommand's --help answer without importing torch (or PyAV, Triton,
    transformers): one fresh interpreter per command would be slower, so one interpreter asks them all."""
    code = ("import sys, contextlib, io\nfrom lipforcing.cli import main, SUBCOMMANDS\n"
            "for cmd in ('',) + SUBCOMMANDS:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            main([a for a in (cmd, '--help') if a])\n"
            "        except SystemExit as e:\n            assert e.code == 0, (cmd, e.code)\n"
            "    assert 'usage: lipforcing' in buf.getvalue(), cmd\n"
            "print('HEAVY', sorted(m for m in ('torch', 'av', 'triton', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-500:]
    assert len(SUBCOMMANDS) >= 5


def _inputs(tmp_path, seconds=1.0):
    video, wav = tmp_path / "face.mp4", tmp_path / "speech.wav"
    make_video(video, 10, 32, seed=int(np.random.randint(1 << 30)))
    make_wav(wav, seconds, 16000, seed=int(np.random.randint(1 << 30)))
    return video, wav


@pytest.mark.parametrize("how", ["symlink", "hardlink", "dotdot"])
def test_sync_output_aliasing_an_input_is_refused(tmp_path, capsys, how):
    video, wav = _inputs(tmp_path)
    (tmp_path / "sub").mkdir()
    alias = tmp_path / "alias.mp4"
    if how == "symlink":
        alias.symlink_to(video)
    elif how == "hardlink":
        os.link(video, alias)
    else:
        alias = tmp_path / "sub" / ".." / "face.mp4"
    before = video.read_bytes()
    rc = main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(alias), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE
    assert err.count("\n") == 1 and "would overwrite the input --video" in err, err
    assert video.read_bytes() == before
    # the wav as output through a symlink too
    (tmp_path / "w.mp4").symlink_to(wav)
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(tmp_path / "w.mp4")]) == EXIT_USAGE
    assert "input --audio" in capsys.readouterr().err


def _interrupt_after(monkeypatch, n, how):
    """Make the n-th frame written by VideoWriter interrupt the command (Ctrl-C, or a real SIGTERM to ourselves)."""
    real = VideoWriter.write

    def write(self, image, audio=None):
        real(self, image, audio)
        if self.frames == n:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)      # main() turns it into the same clean exit as Ctrl-C
            else:
                raise KeyboardInterrupt

    monkeypatch.setattr(VideoWriter, "write", write)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_sync_interrupted_keeps_a_playable_partial_file_and_the_old_output(tmp_path, capsys, monkeypatch, how):
    video, wav = _inputs(tmp_path, seconds=2.0)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"an older result")                   # untouched by an interrupted run
    n = int(np.random.randint(3, 20))
    _interrupt_after(monkeypatch, n, how)
    rc = main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == EXIT_INTERRUPTED == 130
    partial = tmp_path / "out.partial.mp4"
    assert err.splitlines()[-1] == (f"lipforcing sync: interrupted after {n} of 50 frames; partial output kept as "
                                    f"{partial}"), err
    assert "Traceback" not in err
    assert out.read_bytes() == b"an older result"
    frames, _ = read_video(partial)
    assert len(frames) == n
    monkeypatch.undo()
    assert main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(out), "--device", "cpu"]) == 0
    assert len(read_video(out)[0]) == 50 and not partial.exists()   # a complete run replaces the partial one


def test_demo_interrupted(tmp_path, capsys, monkeypatch):
    out = tmp_path / "demo.mp4"
    _interrupt_after(monkeypatch, 1, "ctrl-c")
    rc = main(["demo", "-o", str(out), "--seconds", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 130 and err[-1] == (f"lipforcing demo: interrupted after 1 of 25 frames; partial output kept as "
                                     f"{tmp_path / 'demo.partial.mp4'}")
    assert not out.exists()


def test_defaults_agree_across_commands():
    parser, _ = build_parser()
    args = {name: parser.parse_args([name, *extra]) for name, extra in (
        ("demo", []), ("sync", ["--video", "v.mp4", "-o", "o.mp4"]), ("profile", []), ("serve", []))}
    # one device rule (cuda when available) and the engine's resolution for the tiny preset everywhere
    assert {a.device for a in args.values()} == {None}
    assert {a.resolution for a in args.values()} == {None}
    assert {a.threads for a in args.values()} == {None}


def test_bad_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    video, wav = _inputs(tmp_path)
    ckpt = tmp_path / "student.safetensors"
    ckpt.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":")   # a truncated header
    rc = main(["sync", "--video", str(video), "--audio", str(wav), "-o", str(tmp_path / "o.mp4"),
               "--checkpoint", str(ckpt), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and err.count("\n") == 1 and str(ckpt) in err and "Traceback" not in err, err


@pytest.mark.parametrize("slowdown", [0.5, 1.0, 1.6, 6.0])   # under, near, over and far over the budget
def test_profile_plot_reference_lines_are_named_outside_the_bars(tmp_path, monkeypatch, slowdown):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    from lipforcing.engine import STAGES
    from lipforcing.profiling import plot_profile

    rng = np.random.default_rng(int(np.random.randint(1 << 30)))
    chunks = 16
    per_stage = {s: rng.uniform(1, 60, chunks) * slowdown * (4 if s == "vae_decode" else 1) for s in STAGES}
    per_chunk = sum(per_stage.values())
    total = per_chunk.sum()
    doc = {"stages": {s: {"mean_ms_per_chunk": float(v.mean()), "share": float(v.sum() / total),
                          "per_chunk_ms": v.tolist()} for s, v in per_stage.items()},
           "per_chunk_ms": per_chunk.tolist(), "chunk_frames": 12,
           "chunk_latency_ms": {q: float(np.percentile(per_chunk, p)) for q, p in (("p50", 50), ("p90", 90),
                                                                                   ("p99", 99))},
           "environment": {"gpu": None}, "device": "cpu", "threads": 1, "preset": "tiny", "random_weights": True,
           "resolution": [32, 32], "dtype": "float32", "fps": 30.0, "time_to_first_frame_s": 0.3}
    figs = []
    real_savefig = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figs.append(self), real_savefig(self, *a, **k))[1])
    plot_profile(doc, str(tmp_path / "p.png"))
    (fig,) = figs
    latency_ax = fig.axes[1]
    assert len(latency_ax.texts) == 0                  # nothing written over the bars
    labels = [t.get_text() for t in latency_ax.get_legend().get_texts()]
    assert any(t.startswith("real-time budget: 480 ms per 12 frames") for t in labels), labels
    assert any(t.startswith("p99 chunk latency") for t in labels)
    assert (tmp_path / "p.png").stat().st_size > 10_000
