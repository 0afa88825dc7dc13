"""Audio files as `lipforcing sync` reads them (lipforcing.media.read_audio): float samples beyond the PCM bound
are refused naming the file, a truncated wav is used with a warning, complete and streamed wavs give none."""
import logging
import struct

import numpy as np
import pytest

pytest.importorskip("av")

from lipforcing.media import MediaError, read_audio, wav_truncation, write_wav  # noqa: E402


def _float_wav(path, samples, *, data_size=None):
    x = np.asarray(samples, np.float32)
    size = x.nbytes if data_size is None else data_size
    fmt = struct.pack("<HHIIHH", 3, 1, 16000, 64000, 4, 32)          # IEEE float, mono, 16 kHz
    path.write_bytes(b"RIFF" + struct.pack("<I", 36 + x.nbytes) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
                     + b"data" + struct.pack("<I", size) + x.tobytes())
    return path


@pytest.mark.parametrize("value", [1e20, -3e4])
def test_float_wav_beyond_the_pcm_bound_is_refused(tmp_path, value):
    x = np.random.uniform(-0.5, 0.5, 8000).astype(np.float32)
    x[np.random.randint(0, 8000, 5)] = value
    path = _float_wav(tmp_path / "loud.wav", x)
    with pytest.raises(MediaError, match=r"loud.wav: the audio has [1-5] sample\(s\) beyond \+-10000"):
        read_audio(path)


def test_truncated_wav_warns_and_is_used(tmp_path, caplog):
    x = np.random.uniform(-0.5, 0.5, 16000).astype(np.float32)
    full = tmp_path / "full.wav"
    write_wav(full, x)
    data = full.read_bytes()
    cut = np.random.randint(len(data) // 4, len(data) // 2) & ~1
    short = tmp_path / "short.wav"
    short.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        samples, rate = read_audio(short)
    assert rate == 16000 and 0 < len(samples) < 16000
    msgs = [r.getMessage() for r in caplog.records]
    assert any("short.wav: the wav file is truncated: its header announces 1.00 s" in m for m in msgs), msgs
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lipforcing"):
        assert len(read_audio(full)[0]) == 16000
    assert not caplog.records


def test_wav_truncation_rules(tmp_path):
    x = np.random.uniform(-0.5, 0.5, 1000).astype(np.float32)
    assert wav_truncation(_float_wav(tmp_path / "ok.wav", x)) is None
    assert wav_truncation(_float_wav(tmp_path / "streamed.wav", x, data_size=0xFFFFFFFF)) is None
    assert wav_truncation(_float_wav(tmp_path / "short.wav", x, data_size=4 * 1500)) == (1500, 1000)
    (tmp_path / "not.wav").write_bytes(b"ID3 this is an mp3")
    assert wav_truncation(tmp_path / "not.wav") is None
