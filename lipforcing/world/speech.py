"""Speech of the procedural world: espeak-ng text-to-speech (many voices, rates and sentences) and the built-in
synthetic speech of :func:`lipforcing.media.synthetic_speech`.

Voices and sentences are split into a training and a held-out set (:data:`TRAIN_VOICES`, :data:`EVAL_VOICES`,
:data:`TRAIN_SENTENCES`, :data:`EVAL_SENTENCES`), so evaluation runs on speech the models never heard.  espeak-ng is
optional (``apt-get install espeak-ng``): :func:`espeak_available` says whether it is installed, and
:func:`sample_utterance` falls back to the synthetic speech without it.  Everything is 16 kHz mono float32.
"""
from __future__ import annotations

import io
import shutil
import subprocess
import wave
from dataclasses import dataclass

import numpy as np

__all__ = ["Utterance", "espeak_available", "espeak_utterance", "synthetic_utterance", "sample_utterance",
           "TRAIN_VOICES", "EVAL_VOICES", "TRAIN_SENTENCES", "EVAL_SENTENCES", "SAMPLE_RATE"]

SAMPLE_RATE = 16000
# espeak-ng voice names with a variant (+f2, +m3, ...: pitch/formant variants of the same language voice); every
# name must give its own audio (espeak-ng 1.51 ignores the variant of 'en-gb+f3', which sounded exactly like 'en-gb')
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us+f2", "en+f3", "en-us+m3",
                "en-gb-x-gbclan+f4", "en-us+m7", "en-gb-scotland+f1", "en+klatt")
EVAL_VOICES = ("en-gb-x-gbcwmd", "en-us+f4", "en-029+m2")
TRAIN_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We will meet again tomorrow morning at the old station.",
    "Open the window and let the fresh air come in.",
    "My favourite colour has always been a deep shade of blue.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "She sells sea shells by the sea shore.",
    "Turn left at the bridge, then keep walking until you see the market.",
    "Nobody expected the weather to change so quickly.",
    "Could you repeat that, please? I did not quite hear you.",
    "Thank you all for coming here today.",
    "The music was loud, but the people kept on talking.",
    "A big black bug bit a big black bear.",
    "I would like a cup of tea with milk and no sugar.",
    "Every morning the baker opens his shop at six.",
    "Look out of the window, it is snowing again!",
    "Numbers like one, two, three and four are easy to say.",
    "Who owns the blue boat moored near the pier?",
    "Papa, please pass the peppers and the potatoes.",
    "We often wonder why the moon looks so bright in winter.",
    "Yes, no, maybe, I really am not sure about it.",
    "Zebras and yaks live in very different places.",
    "Oh, you should have seen the look on his face!",
    "Bring the map, the lamp and the book to the camp.",
)
EVAL_SENTENCES = (
    "Good evening, and welcome to the news at nine.",
    "Wow, those purple flowers smell wonderful in the sun.",
    "I think we should leave before it gets too dark outside.",
    "Mom made more muffins on Monday morning.",
    "Everyone agreed that the old movie was much better.",
    "Who would you choose if you could only pick one?",
)
_PAUSE = (0.15, 0.6)          # seconds of silence between sentences


@dataclass(frozen=True)
class Utterance:
    """16 kHz mono float32 ``samples`` in about [-1, 1], with where they came from."""

    samples: np.ndarray
    text: str
    voice: str
    source: str               # "espeak" or "synthetic"

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def espeak_available() -> bool:
    """Whether the ``espeak-ng`` program is installed."""
    return shutil.which("espeak-ng") is not None


def _to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    if rate == SAMPLE_RATE:
        return x.astype(np.float32)
    import torch

    from lipforcing.audio.resample import resample

    return resample(torch.from_numpy(x.astype(np.float32)), rate, SAMPLE_RATE).numpy().astype(np.float32)


def espeak_utterance(text: str, *, voice: str = "en-us", rate: int = 160, pitch: int = 50) -> Utterance:
    """Speak ``text`` with espeak-ng (``rate`` in words per minute, ``pitch`` 0-99); peak-normalised to 0.5.

    Raises RuntimeError when espeak-ng is not installed or fails (its message included)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("text must be a non-empty string")
    cmd = ["espeak-ng", "-v", str(voice), "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.decode(errors='replace').strip()}")
    with wave.open(io.BytesIO(proc.stdout)) as w:
        rate_hz, n = w.getframerate(), w.getnframes()
        data = np.frombuffer(w.readframes(n), np.int16).astype(np.float32) / 32768.0
    x = _to_16k(data, rate_hz)
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 0:
        x = x * (0.5 / peak)
    return Utterance(x.astype(np.float32), text, str(voice), "espeak")


def synthetic_utterance(seconds: float, *, seed: int = 0) -> Utterance:
    """The built-in speech-like signal (formant syllables with pauses), ``seconds`` long."""
    from lipforcing.media import synthetic_speech

    return Utterance(synthetic_speech(seconds, SAMPLE_RATE, seed=seed), "", f"synthetic-{seed}", "synthetic")


def sample_utterance(seed: int, *, seconds: float, split: str = "train", source: str = "auto") -> Utterance:
    """About ``seconds`` of speech (exactly ``round(seconds * 16000)`` samples: padded with silence or cut).

    split : ``"train"`` or ``"eval"`` (held-out voices and sentences).
    source : ``"espeak"``, ``"synthetic"`` or ``"auto"`` (espeak-ng when installed, for 3 of 4 seeds; the
        synthetic speech otherwise).  The voice, rate (130-200 wpm), pitch and the sentences are drawn from
        ``seed``; sentences follow each other with short pauses until ``seconds`` are filled.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if source not in ("auto", "espeak", "synthetic"):
        raise ValueError(f"source must be 'auto', 'espeak' or 'synthetic', got {source!r}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    n = int(round(seconds * SAMPLE_RATE))
    rng = np.random.default_rng([int(seed), 0x5E, 0 if split == "train" else 1])
    use_espeak = source == "espeak" or (source == "auto" and espeak_available() and rng.uniform() < 0.75)
    if not use_espeak:
        u = synthetic_utterance(seconds, seed=int(seed) * 2 + (split == "eval"))
        return Utterance(_fit(u.samples, n), u.text, u.voice, u.source)
    voices = TRAIN_VOICES if split == "train" else EVAL_VOICES
    sentences = TRAIN_SENTENCES if split == "train" else EVAL_SENTENCES
    voice = voices[int(rng.integers(len(voices)))]
    rate, pitch = int(rng.integers(130, 201)), int(rng.integers(30, 71))
    parts, texts = [np.zeros(int(rng.uniform(0.05, 0.3) * SAMPLE_RATE), np.float32)], []
    total = len(parts[0])
    while total < n:
        text = sentences[int(rng.integers(len(sentences)))]
        u = espeak_utterance(text, voice=voice, rate=rate, pitch=pitch)
        pause = np.zeros(int(rng.uniform(*_PAUSE) * SAMPLE_RATE), np.float32)
        parts += [u.samples, pause]
        texts.append(text)
        total += len(u.samples) + len(pause)
    return Utterance(_fit(np.concatenate(parts), n), " ".join(texts), voice, "espeak")


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n, np.float32)
    m = min(n, len(x))
    out[:m] = x[:m]
    return out
