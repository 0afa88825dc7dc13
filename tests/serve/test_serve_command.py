"""The ``lipforcing serve`` command as a process on 127.0.0.1: it comes up (/health), serves a prepared avatar from
--avatars, refuses a session beyond --max-sessions with a 'busy' error on a connection that stays usable, counts it
in /metrics, and exits 0 on Ctrl-C (SIGINT)."""
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")

from lipforcing.serve.protocol import decode_frame  # noqa: E402
from tests.stream.helpers import RES, reference_frames, speech  # noqa: E402

P = 640
TIMEOUT = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _receive_json(ws):
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def _session(base, rng):
    async with aiohttp.ClientSession() as http:
        t0 = time.monotonic()
        while True:                                        # the server is up once /health answers
            try:
                async with http.get(f"{base}/health") as r:
                    health = await r.json()
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() - t0 < TIMEOUT, "lipforcing serve did not come up"
                await asyncio.sleep(0.2)
        assert health["status"] == "ok" and health["avatars"] == ["amy"]
        pcm16 = (speech(P * int(rng.integers(13, 30)) + int(rng.integers(1, P)), seed=int(rng.integers(1 << 30)))
                 * 30000).astype(np.int16)
        async with http.ws_connect(f"{base.replace('http', 'ws')}/ws") as a, \
                http.ws_connect(f"{base.replace('http', 'ws')}/ws") as b:
            await a.send_json({"type": "start", "avatar": "amy"})
            assert (await _receive_json(a))["type"] == "started"
            await b.send_json({"type": "start", "avatar": "amy"})
            refused = await _receive_json(b)
            assert refused["type"] == "error" and refused["code"] == "busy", refused
            assert "engine is full" in refused["message"] and "max_sessions is 1" in refused["message"]
            async with http.get(f"{base}/metrics") as r:
                metrics = await r.text()
            await a.send_json({"type": "close"})
            assert (await _receive_json(a))["type"] == "closed"
            await b.send_json({"type": "start", "avatar": "amy", "video_format": "rgb"})   # b is still usable
            assert (await _receive_json(b))["type"] == "started"
            await b.send_bytes(pcm16.astype("<i2").tobytes())
            await b.send_json({"type": "end_of_speech"})
            frames = [decode_frame((await b.receive(timeout=TIMEOUT)).data) for _ in range(-(-len(pcm16) // P))]
        return metrics, frames


def test_serve_command_admission_and_shutdown(tmp_path, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    np.save(tmp_path / "amy.npy", reference_frames(2, seed=int(rng.integers(1 << 30))))
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lipforcing", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--resolution", str(RES), "--max-sessions", "1",
                             "--avatars", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        metrics, frames = asyncio.run(asyncio.wait_for(_session(f"http://127.0.0.1:{port}", rng), 3 * TIMEOUT))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert f"ws://127.0.0.1:{port}/ws" in out
    assert "\nlipforcing_sessions 1\n" in metrics and "\nlipforcing_sessions_refused_total 1\n" in metrics
    assert [h["index"] for h, _, _ in frames] == list(range(len(frames)))
    assert all(img.shape == (RES, RES, 3) and audio.shape == (P,) for _, img, audio in frames)
