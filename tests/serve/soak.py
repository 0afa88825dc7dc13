"""Soak test of ``lipforcing serve`` (run by hand, not collected by pytest; loopback only, stops by itself).

    python tests/serve/soak.py --clients 4 --seconds 180

Starts ``lipforcing serve`` (tiny preset, CPU) on 127.0.0.1 in a subprocess; each client streams speech-like audio
in real time (20 ms pieces) in utterances of 2-5 s with pauses, ends each with end_of_speech, interrupts one
utterance in eight, and checks that its frames come in index order, one per 640 samples.  Reported: per client the
frame lag (arrival of frame i minus the moment its audio was sent, p50/p99), frames and errors; the server's
resident memory at the start and end and its peak; its chunk-latency quantiles from /metrics.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import aiohttp
import numpy as np

from lipforcing.serve.protocol import decode_frame

P = 640


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _client(url, k, seconds, stats, res):
    import base64

    rng = np.random.default_rng(k)
    lags, errors, interrupts = [], 0, 0
    st = {"frames": 0, "next": 0, "base": None, "t0": None}
    async with aiohttp.ClientSession() as http, http.ws_connect(url, max_msg_size=0) as ws:
        ref = rng.integers(0, 256, (4, res, res, 3), dtype=np.uint8)
        await ws.send_json({"type": "start", "video_format": "jpeg", "seed": k, "reference": {
            "rgb": base64.b64encode(ref.tobytes()).decode(), "frames": 4, "height": res, "width": res}})
        started = json.loads((await ws.receive()).data)
        assert started["type"] == "started", started

        async def reader():
            nonlocal errors
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    h, _, _ = decode_frame(msg.data)
                    if h["index"] < st["next"]:
                        errors += 1                      # out of order or repeated
                    st["next"] = h["index"] + 1
                    st["frames"] += 1
                    if st["t0"] is not None:
                        if st["base"] is None:
                            st["base"] = h["index"]
                        # frame j of the utterance is due once its audio (j + 1) * 40 ms was sent
                        lags.append(time.monotonic() - (st["t0"] + (h["index"] - st["base"] + 1) * 0.04))
                elif msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "error":
                    errors += 1

        task = asyncio.create_task(reader())
        t_end = time.monotonic() + seconds
        expected = 0
        while time.monotonic() < t_end:
            n = int(rng.uniform(2.0, 5.0) * 16000)
            t = np.arange(n) / 16000
            pcm = (0.3 * np.sin(2 * np.pi * rng.uniform(110, 220) * t) * (1 + np.sin(2 * np.pi * 3 * t))
                   * 16000).astype(np.int16)
            interrupt_at = n // 2 if rng.random() < 0.125 else None
            start = time.monotonic()
            st["base"], st["t0"] = None, start
            for i in range(0, n, 320):
                if interrupt_at is not None and i >= interrupt_at:
                    await ws.send_json({"type": "interrupt"})
                    interrupts += 1
                    break
                await ws.send_bytes(pcm[i:i + 320].tobytes())
                delay = start + (i + 320) / 16000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if interrupt_at is None:
                await ws.send_json({"type": "end_of_speech"})
                expected += -(-n // P)
                t_wait = time.monotonic() + 10
                while st["frames"] < expected and time.monotonic() < t_wait:
                    await asyncio.sleep(0.01)
                if st["frames"] != expected:
                    errors += 1
            else:
                st["t0"] = None
                await asyncio.sleep(1.0)
                expected = st["frames"]
            st["t0"] = None
            await asyncio.sleep(rng.uniform(0.3, 0.8))
        await ws.send_json({"type": "close"})
        await asyncio.sleep(0.5)
        task.cancel()
    stats[k] = {"frames": st["frames"], "errors": errors, "interrupts": interrupts,
                "lag_p50_ms": 1e3 * float(np.percentile(lags, 50)) if lags else None,
                "lag_p99_ms": 1e3 * float(np.percentile(lags, 99)) if lags else None}


async def _main(args):
    port = _free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    srv = subprocess.Popen([sys.executable, "-m", "lipforcing", "serve", "--port", str(port), "--device", "cpu",
                            "--max-sessions", "none", "--resolution", str(args.resolution)], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(600):
                try:
                    async with http.get(base + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)
            rss0 = _rss_mib(srv.pid)
            peak = rss0
            stats: dict = {}
            url = f"ws://127.0.0.1:{port}/ws"
            clients = [asyncio.create_task(_client(url, k, args.seconds, stats, args.resolution))
                       for k in range(args.clients)]
            while not all(c.done() for c in clients):
                peak = max(peak, _rss_mib(srv.pid))
                await asyncio.sleep(1.0)
            for c in clients:
                c.result()
            async with http.get(base + "/metrics") as r:
                metrics = await r.text()
            async with http.get(base + "/health") as r:
                health = await r.json()
            rss1 = _rss_mib(srv.pid)
    finally:
        srv.terminate()
        srv.wait(30)
    lat = dict(re.findall(r'lipforcing_chunk_latency_seconds\{quantile="([0-9.]+)"\} ([0-9.e+-]+)', metrics))
    steps = dict(re.findall(r'lipforcing_batch_steps_total\{batch="(\d+)"\} ([0-9.e+-]+)', metrics))
    print(json.dumps({"clients": args.clients, "seconds": args.seconds, "per_client": stats,
                      "server_rss_mib": {"start": rss0, "end": rss1, "peak": peak},
                      "chunk_latency_s": lat, "batch_steps": steps, "health_after": health}, indent=1))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=180.0)
    ap.add_argument("--resolution", type=int, default=32)
    asyncio.run(_main(ap.parse_args()))
