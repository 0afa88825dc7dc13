"""The progress display of the long commands: a tqdm bar on a terminal, sparse plain lines elsewhere."""
import io
import random

from lipforcing import cli
from lipforcing.cli import _common


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_not_a_terminal_prints_no_bar(_fresh_random_inputs):
    rng = random.Random(_fresh_random_inputs)
    total = rng.randrange(50, 500)
    out = io.StringIO()
    with _common.progress(total, "sync", file=out, interval=3600.0) as bar:    # short work: nothing at all
        for _ in range(total):
            bar.update(1)
    assert out.getvalue() == ""

    out = io.StringIO()
    steps = rng.randrange(3, 12)
    bar = _common.progress(total, "warm-up", file=out, interval=0.0)         # every update is "due"
    for i in range(steps):
        if i == 1:
            bar.set_description("measure")
        bar.update(2)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert len(lines) == steps
    assert lines[0].startswith(f"warm-up: 2/{total} frames") and lines[-1].startswith(f"measure: {2 * steps}/{total}")


def test_terminal_gets_a_tqdm_bar(_fresh_random_inputs):
    from tqdm import tqdm

    total = random.Random(_fresh_random_inputs).randrange(5, 50)
    out = _Tty()
    with _common.progress(total, "sync", file=out) as bar:
        assert isinstance(bar, tqdm)
        bar.update(total)
    assert "\r" in out.getvalue()


def test_commands_report_progress_without_a_terminal(tmp_path, capsys, monkeypatch):
    """`lipforcing demo` with stderr captured (not a terminal): no tqdm redraws, plain lines when due."""
    real = _common.progress
    calls = []

    def spy(total, desc, **kw):
        calls.append(desc)
        return real(total, desc, interval=0.0, **kw)

    import lipforcing.cli.demo

    monkeypatch.setattr(lipforcing.cli.demo, "progress", spy)
    assert cli.main(["demo", "-o", str(tmp_path / "d.mp4"), "--seconds", "0.5"]) == 0
    err = capsys.readouterr().err
    assert calls == ["streaming"]
    assert "\r" not in err and "streaming: " in err and "frames (" in err
