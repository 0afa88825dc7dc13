"""Streaming band-limited resampling (polyphase windowed sinc) in plain torch.

Algorithm. With g = gcd(orig, new), up = new / g and down = orig / g, output sample n sits at input position
t_n = n * down / up (both streams start at time 0).  It is

    y[n] = sum_k x[k] * h(t_n - k),   k = floor(t_n) - W + 1 .. floor(t_n) + W

with h a Kaiser-windowed sinc low-pass whose cutoff is ``rolloff`` times the Nyquist frequency of the lower of
the two rates (so downsampling does not alias), W = ceil(zero_crossings / (2 * cutoff)) input samples, and each
set of taps normalised to sum to 1 (exact unity gain at DC).  The taps only depend on the phase
(n * down) mod up, so for moderate ``up`` they are tabulated once (the polyphase filter bank).

Streaming.  Samples before the start of the stream are zeros.  ``push`` returns every output sample whose taps
are all available: the resampler looks ``W`` input samples ahead (``lookahead``).  ``flush`` pads the end with
zeros, returns the rest of the ceil(len * up / down) output samples and resets.  Any split of the input into
pushes gives the same output as ``resample`` on the whole signal (up to float rounding of the identical sums).
"""
from __future__ import annotations

import math

import torch

from lipforcing.audio.pcm import SAMPLE_RATE, check_sample_rate

_MAX_TABLE_PHASES = 4096   # tabulate the polyphase bank up to this many phases, else compute taps per sample
_BLOCK = 8192              # output samples computed per gather (bounds temporary memory)


class Resampler:
    """Incremental resampler from ``orig_sr`` to ``new_sr`` (default 16 kHz).

    Args:
        orig_sr, new_sr: int sample rates (TypeError if not int, ValueError if <= 0).
        zero_crossings: half-length of the sinc in zero crossings of the low-pass (quality vs. cost; 16 gives
            a stop band better than about -80 dB with the default Kaiser beta).
        rolloff: cutoff as a fraction of the lower Nyquist frequency (0 < rolloff <= 1).
        beta: Kaiser window parameter.
    Input to ``push``: 1-D float32 tensor (see ``lipforcing.audio.to_mono_float``). Output: 1-D float32 tensor on the
    same device. The state (a few hundred samples of history) lives on the device of the last push.
    """

    def __init__(self, orig_sr: int, new_sr: int = SAMPLE_RATE, *, zero_crossings: int = 16,
                 rolloff: float = 0.945, beta: float = 8.555):
        orig_sr = check_sample_rate(orig_sr, "orig_sr")
        new_sr = check_sample_rate(new_sr, "new_sr")
        if not 0.0 < rolloff <= 1.0:
            raise ValueError(f"rolloff must be in (0, 1], got {rolloff}")
        if isinstance(zero_crossings, bool) or not isinstance(zero_crossings, int) or zero_crossings < 1:
            raise ValueError(f"zero_crossings must be an int >= 1, got {zero_crossings!r}")
        g = math.gcd(orig_sr, new_sr)
        self.orig_sr, self.new_sr = orig_sr, new_sr
        self.up, self.down = new_sr // g, orig_sr // g
        self.identity = self.up == self.down
        # cutoff in cycles per input sample
        self._fc = rolloff * 0.5 * min(1.0, self.up / self.down)
        self._beta = float(beta)
        self.lookahead = 0 if self.identity else int(math.ceil(zero_crossings / (2.0 * self._fc)))
        W = self.lookahead
        self._j = torch.arange(-W + 1, W + 1, dtype=torch.float64)     # tap offsets k - floor(t_n)
        self._table = None
        if not self.identity and self.up <= _MAX_TABLE_PHASES:
            self._table = self._taps(torch.arange(self.up, dtype=torch.float64) / self.up).to(torch.float32)
        self.reset()

    # -- filter design --------------------------------------------------------------------------------------------
    def _taps(self, frac: torch.Tensor) -> torch.Tensor:
        """Taps for fractional positions ``frac`` (n,) in [0, 1): (n, 2W) float64, rows summing to 1."""
        W, fc = self.lookahead, self._fc
        tau = frac[:, None] - self._j[None, :]                  # t_n - k
        h = 2.0 * fc * torch.sinc(2.0 * fc * tau)
        r = (tau / W).clamp(-1.0, 1.0)
        win = torch.special.i0(self._beta * torch.sqrt((1.0 - r * r).clamp_min(0.0))) / torch.special.i0(
            torch.tensor(self._beta, dtype=torch.float64))
        h = h * win
        return h / h.sum(dim=1, keepdim=True)

    # -- state ----------------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all input: the next push starts a new signal at time 0."""
        W = self.lookahead
        self._buf = torch.zeros(W, dtype=torch.float32)   # history; _buf[0] is input sample index _buf_start
        self._buf_start = -W                              # virtual zeros before the start of the stream
        self._n_in = 0
        self._n_out = 0

    def _outputs(self, n_end: int, buf: torch.Tensor) -> torch.Tensor:
        """Output samples _n_out .. n_end-1 computed from ``buf`` (starting at input index _buf_start)."""
        out = []
        W = self.lookahead
        dev = buf.device
        for n0 in range(self._n_out, n_end, _BLOCK):
            n = torch.arange(n0, min(n_end, n0 + _BLOCK), dtype=torch.int64)
            pos = n * self.down
            base = torch.div(pos, self.up, rounding_mode="floor")
            phase = pos - base * self.up
            if self._table is not None:
                w = self._table.to(dev)[phase.to(dev)]
            else:
                w = self._taps(phase.to(torch.float64) / self.up).to(device=dev, dtype=torch.float32)
            idx = (base - self._buf_start - W + 1)[:, None] + torch.arange(2 * W, dtype=torch.int64)[None, :]
            out.append((buf[idx.to(dev)] * w).sum(dim=1))
        return torch.cat(out) if out else buf.new_zeros(0)

    def push(self, x: torch.Tensor) -> torch.Tensor:
        """Append input samples (1-D float tensor at ``orig_sr``); return the newly available output samples."""
        if not isinstance(x, torch.Tensor) or x.dim() != 1 or not x.is_floating_point():
            raise TypeError("x must be a 1-D float torch.Tensor (use lipforcing.audio.to_mono_float first), got "
                            f"{type(x).__name__}{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
        x = x.to(torch.float32)
        if self.identity:
            self._n_in += x.numel()
            self._n_out += x.numel()
            return x.clone()
        self._buf = torch.cat([self._buf.to(x.device), x])
        self._n_in += x.numel()
        # output n is ready when its last tap floor(t_n) + W is an input we have: floor(n*down/up) <= n_in-1-W
        avail = self._n_in - self.lookahead
        n_end = max(self._n_out, -((-avail * self.up) // self.down)) if avail > 0 else self._n_out
        y = self._outputs(n_end, self._buf)
        self._n_out = n_end
        self._trim()
        return y

    def flush(self) -> torch.Tensor:
        """End of signal: zero-pad, return the remaining output samples (ceil(n_in * up / down) in total), reset."""
        if self.identity:
            self.reset()
            return torch.zeros(0, dtype=torch.float32)
        total = -((-self._n_in * self.up) // self.down)
        buf = torch.cat([self._buf, self._buf.new_zeros(self.lookahead + 1)])
        y = self._outputs(total, buf)
        self.reset()
        return y

    def _trim(self) -> None:
        # the next output's first tap is floor(t_{n_out}) - W + 1; everything before it can go
        first = (self._n_out * self.down) // self.up - self.lookahead + 1
        drop = first - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:].clone()
            self._buf_start = first


def resample(x: torch.Tensor, orig_sr: int, new_sr: int = SAMPLE_RATE, **kwargs) -> torch.Tensor:
    """Resample a whole 1-D float signal; returns ceil(len * new_sr / orig_sr) samples (float32).

    Same filter and output as pushing ``x`` through a :class:`Resampler` in any pieces and flushing.
    """
    r = Resampler(orig_sr, new_sr, **kwargs)
    y = r.push(x)
    return torch.cat([y, r.flush().to(y.device)])
