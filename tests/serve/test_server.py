"""`lipforcing serve` on 127.0.0.1 through aiohttp's WebSocket client: exactly the frames a session alone gives, for
1 and 4 concurrent clients; malformed messages refused with the connection still usable; a killed client frees its
session; /health and /metrics."""
import asyncio
import base64
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp.test_utils import TestServer  # noqa: E402

from lipforcing.serve.protocol import decode_frame  # noqa: E402
from lipforcing.serve.server import AvatarStore, LipSyncServer  # noqa: E402
from tests.stream.helpers import RES, reference_frames, speech  # noqa: E402

P = 640
TIMEOUT = 60


def _rgb_reference(ref):
    n, h, w, _ = ref.shape
    return {"rgb": base64.b64encode(ref.tobytes()).decode(), "frames": n, "height": h, "width": w}


def _alone(engine, ref, pcm16, seed):
    with engine.session(ref, seed=seed) as s:
        s.push_audio(pcm16)
        s.end_of_speech()
        return list(s.frames())


def _case(rng):
    n = int(rng.integers(20, 33)) * P + int(rng.integers(1, P))       # 2-3 chunks and a partial frame
    pcm16 = (speech(n, seed=int(rng.integers(1 << 30))) * 32767).astype(np.int16)
    return reference_frames(int(rng.integers(1, 6)), seed=int(rng.integers(1 << 30))), pcm16, int(rng.integers(1000))


async def _run_server(engine, body, **kw):
    server = LipSyncServer(engine, **kw)
    async with TestServer(server.app(), host="127.0.0.1") as ts, aiohttp.ClientSession() as http:
        return await asyncio.wait_for(body(ts, http, server), TIMEOUT)


async def _expect(ws, kind, code=None):
    msg = await ws.receive(timeout=TIMEOUT)
    assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data if msg.type != aiohttp.WSMsgType.BINARY else "")
    body = json.loads(msg.data)
    assert body["type"] == kind, body
    if code is not None:
        assert body["code"] == code, body
    return body


async def _client(http, url, ref, pcm16, seed, rng, *, avatar=None, video_format="rgb"):
    """One client: start, the audio in random pieces, end_of_speech, read exactly one frame per 640 samples."""
    async with http.ws_connect(url) as ws:
        start = {"type": "start", "seed": seed, "video_format": video_format, "sample_rate": 16000}
        start.update({"avatar": avatar} if avatar else {"reference": _rgb_reference(ref)})
        await ws.send_json(start)
        started = await _expect(ws, "started")
        assert (started["width"], started["height"], started["fps"], started["samples_per_frame"]) == (RES, RES, 25, P)
        i = 0
        while i < len(pcm16):
            n = int(rng.integers(1, 3 * P))
            await ws.send_bytes(pcm16[i:i + n].astype("<i2").tobytes())
            i += n
        await ws.send_json({"type": "end_of_speech"})
        frames = []
        while len(frames) < -(-len(pcm16) // P):
            msg = await ws.receive(timeout=TIMEOUT)
            assert msg.type == aiohttp.WSMsgType.BINARY, msg
            frames.append(decode_frame(msg.data))
        await ws.send_json({"type": "close"})
        await _expect(ws, "closed")
    return frames


def _check(frames, alone, pcm16):
    assert [h["index"] for h, _, _ in frames] == list(range(len(alone)))
    padded = np.concatenate([pcm16, np.zeros(len(alone) * P - len(pcm16), np.int16)])
    for (h, img, audio), f in zip(frames, alone):
        assert h["pts"] == f.index / 25 and h["chunk_id"] == f.chunk_id
        np.testing.assert_array_equal(img, f.image)
        np.testing.assert_array_equal(audio, padded[f.index * P:(f.index + 1) * P])


def test_one_and_four_clients_get_exactly_their_frames(serve_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    cases = [_case(rng) for _ in range(5)]
    alone = [_alone(serve_engine, *c) for c in cases]
    assert len({len(a) for a in alone}) >= 1 and all(len(a) > 20 for a in alone)

    async def body(ts, http, server):
        url = ts.make_url("/ws")
        one = await _client(http, url, None, cases[0][1], cases[0][2], rng, avatar="first")
        four = await asyncio.gather(*[_client(http, url, *c, np.random.default_rng(k)) for k, c in
                                      enumerate(cases[1:])])
        return [one, *four], server

    got, server = asyncio.run(_run_server(serve_engine, body, avatars={"first": cases[0][0]}))
    for frames, a, c in zip(got, alone, cases):
        _check(frames, a, c[1])
    assert server.counters["frames_sent_total"] == sum(len(a) for a in alone)
    st = serve_engine.stats()
    assert st["sessions"] == 0 and max(st["batch_sizes"]) >= 1


def test_malformed_messages_are_refused_and_the_connection_stays_usable(serve_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    ref, pcm16, seed = _case(rng)
    pcm16 = pcm16[:P * 9 + 200]
    alone = _alone(serve_engine, ref, pcm16, seed)

    async def body(ts, http, server):
        async with http.ws_connect(ts.make_url("/ws")) as ws:
            await ws.send_str("not json {")
            await _expect(ws, "error", "bad_json")
            await ws.send_json({"type": "dance"})
            await _expect(ws, "error", "unknown_type")
            await ws.send_str("[1, 2]")
            await _expect(ws, "error", "bad_json")
            await ws.send_bytes(b"\x00\x01")
            await _expect(ws, "error", "not_started")
            await ws.send_json({"type": "end_of_speech"})
            await _expect(ws, "error", "not_started")
            bad_starts = [
                ({"sample_rate": 5}, "bad_start"),
                ({"audio_format": "mp3"}, "bad_start"),
                ({"video_format": "gif"}, "bad_start"),
                ({"colour": "red"}, "bad_start"),
                ({"avatar": "nobody"}, "unknown_avatar"),
                ({"avatar": "../etc/passwd"}, "bad_start"),
                ({"reference": {"rgb": "!!!", "frames": 1, "height": RES, "width": RES}}, "bad_reference"),
                ({"reference": {**_rgb_reference(ref), "frames": len(ref) + 1}}, "bad_reference"),
                ({"reference": _rgb_reference(reference_frames(1, res=RES * 2))}, "bad_reference"),
                ({"reference": {"image": base64.b64encode(b"not an image").decode()}}, "bad_reference"),
            ]
            for extra, code in bad_starts:
                start = {"type": "start", "reference": _rgb_reference(ref), **extra}
                if "avatar" in extra:
                    del start["reference"]
                await ws.send_json(start)
                await _expect(ws, "error", code)
            assert serve_engine.stats()["sessions"] == 0
            await ws.send_json({"type": "start", "seed": seed, "video_format": "rgb",
                                "reference": _rgb_reference(ref)})
            await _expect(ws, "started")
            await ws.send_json({"type": "start", "reference": _rgb_reference(ref)})
            await _expect(ws, "error", "already_started")
            await ws.send_bytes(b"\x00\x01\x02")                       # 1.5 int16 samples
            await _expect(ws, "error", "bad_audio")
            await ws.send_bytes(pcm16.astype("<i2").tobytes())
            await ws.send_json({"type": "end_of_speech"})
            frames = []
            while len(frames) < len(alone):
                msg = await ws.receive(timeout=TIMEOUT)
                assert msg.type == aiohttp.WSMsgType.BINARY, msg
                frames.append(decode_frame(msg.data))
            return frames, server.counters["protocol_errors_total"]

    frames, errors = asyncio.run(_run_server(serve_engine, body))
    _check(frames, alone, pcm16)
    assert errors == 17


_KILLED_CLIENT = """
import asyncio, base64, sys
import aiohttp
import numpy as np

async def main(url, res):
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url) as ws:
            ref = np.full((1, res, res, 3), 128, np.uint8)
            await ws.send_json({"type": "start", "video_format": "jpeg", "reference": {
                "rgb": base64.b64encode(ref.tobytes()).decode(), "frames": 1, "height": res, "width": res}})
            await ws.receive()
            t = np.arange(16000 * 4) / 16000
            await ws.send_bytes((np.sin(2 * np.pi * 200 * t) * 9000).astype("<i2").tobytes())
            while (await ws.receive()).type != aiohttp.WSMsgType.BINARY:
                pass
            print("frame", flush=True)
            await asyncio.sleep(600)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_killed_client_frees_its_session(serve_engine):
    async def body(ts, http, server):
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _KILLED_CLIENT, str(ts.make_url("/ws")),
                                                    str(RES), stdout=subprocess.PIPE)
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            assert line.strip() == b"frame"
            assert serve_engine.stats()["sessions"] == 1 and server.connections == 1
        finally:
            proc.kill()                                       # SIGKILL: no close handshake
            await proc.wait()
        t0 = time.monotonic()
        while (serve_engine.stats()["sessions"] or server.connections) and time.monotonic() - t0 < 20:
            await asyncio.sleep(0.05)
        return serve_engine.stats(), server.connections

    stats, conns = asyncio.run(_run_server(serve_engine, body))
    assert stats["sessions"] == 0 and stats["queued_chunks"] == 0 and conns == 0


def test_health_and_metrics(serve_engine, tmp_path):
    np.save(tmp_path / "bob.npy", reference_frames(2))
    (tmp_path / "notes.txt").write_text("not an avatar")

    async def body(ts, http, server):
        async with http.get(ts.make_url("/health")) as r:
            health = await r.json()
            assert r.status == 200
        async with http.get(ts.make_url("/metrics")) as r:
            text = await r.text()
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        return health, text

    health, text = asyncio.run(_run_server(serve_engine, body, avatars=tmp_path))
    assert health["status"] == "ok" and health["avatars"] == ["bob"] and health["resolution"] == [RES, RES]
    for name in ("lipforcing_sessions", "lipforcing_queued_chunks", "lipforcing_chunk_latency_seconds",
                 "lipforcing_step_seconds", "lipforcing_frames_sent_total", "lipforcing_connections"):
        assert f"# TYPE {name} " in text, name
    assert 'lipforcing_chunk_latency_seconds{quantile="0.99"}' in text
    assert AvatarStore(tmp_path).get("bob").shape == (2, RES, RES, 3)
    with pytest.raises(ValueError, match="not a folder"):
        AvatarStore(tmp_path / "bob.npy")


def test_opening_a_session_does_not_block_the_event_loop(serve_engine, monkeypatch):
    # engine.session runs face detection and tracking on a full-frame reference (seconds): the server must open it
    # in a worker thread, or every other connection's frames and /health wait meanwhile
    entered, gate, released = threading.Event(), threading.Event(), []
    real = serve_engine.session

    def slow_session(*args, **kwargs):
        entered.set()
        released.append(gate.wait(5))
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_engine, "session", slow_session)

    async def body(ts, http, server):
        async with http.ws_connect(ts.make_url("/ws")) as ws:
            await ws.send_json({"type": "start", "reference": _rgb_reference(reference_frames(1))})
            while not entered.is_set():
                await asyncio.sleep(0.01)
            async with http.get(ts.make_url("/health")) as r:       # answered while the session is being opened
                assert r.status == 200
            gate.set()
            await _expect(ws, "started")
            await ws.send_json({"type": "close"})
            await _expect(ws, "closed")

    asyncio.run(_run_server(serve_engine, body))
    assert released == [True]


def test_prepared_avatars_detect_the_face_once(serve_engine, tmp_path, monkeypatch, _fresh_random_inputs):
    pytest.importorskip("cv2")
    import lipforcing.face.detect as detect
    from tests.face.helpers import astronaut, clip

    rng = np.random.default_rng(_fresh_random_inputs)
    frames, _, _ = clip(astronaut(), (240, 320), 3, rng, start=(150, 120), end=(160, 125), scale=(0.8, 0.8))
    np.save(tmp_path / "amy.npy", frames)
    serve_engine.prepare(frames, tmp_path / "ben.safetensors")      # written by engine.prepare: no detection
    (tmp_path / "weights.safetensors").write_bytes(b"\x10" + b"\0" * 15)   # not a prepared reference: not listed
    pcm16 = (speech(P * 14 + 77, seed=int(rng.integers(1 << 30))) * 30000).astype(np.int16)
    with serve_engine.session(frames, seed=3) as s:
        s.push_audio(pcm16)
        s.end_of_speech()
        alone = list(s.frames(timeout=TIMEOUT))
    calls = []
    real = detect.detect_faces
    monkeypatch.setattr(detect, "detect_faces", lambda *a, **k: calls.append(1) or real(*a, **k))

    async def body(ts, http, server):
        assert server.avatars.ids() == ["amy", "ben"]
        counts, got = [], {}
        async with http.ws_connect(ts.make_url("/ws")) as ws:
            for avatar in ("amy", "amy", "ben"):
                await ws.send_json({"type": "start", "avatar": avatar, "seed": 3, "video_format": "rgb"})
                started = await _expect(ws, "started")
                assert (started["width"], started["height"]) == (320, 240)      # the full frames come back
                counts.append(len(calls))
                await ws.send_bytes(pcm16.astype("<i2").tobytes())
                await ws.send_json({"type": "end_of_speech"})
                got[avatar] = [decode_frame((await ws.receive(timeout=TIMEOUT)).data) for _ in alone]
                await ws.send_json({"type": "close"})
                await _expect(ws, "closed")
        return counts, got

    counts, got = asyncio.run(_run_server(serve_engine, body, avatars=tmp_path))
    assert counts[0] > 0 and counts == [counts[0]] * 3               # amy detected at her first start only
    for frames_ in got.values():
        assert [h["index"] for h, _, _ in frames_] == [f.index for f in alone]
        for (h, img, _), f in zip(frames_, alone):
            assert (h["width"], h["height"]) == (320, 240)
            np.testing.assert_array_equal(img, f.image)


def test_interrupt_over_the_socket_with_f32le_at_24khz_and_jpeg(serve_engine, _fresh_random_inputs):
    rng = np.random.default_rng(_fresh_random_inputs)
    ref = reference_frames(2, seed=int(rng.integers(1 << 30)))
    rate = 24000
    long32 = speech(rate * 20, seed=int(rng.integers(1 << 30)))                    # 500 frames
    short32 = speech(int(rate * 0.5) + int(rng.integers(1, 900)), seed=int(rng.integers(1 << 30)))
    with serve_engine.session(ref, sample_rate=rate) as s:
        s.push_audio(short32)
        s.end_of_speech()
        n_short = len(list(s.frames(timeout=TIMEOUT)))

    async def body(ts, http, server):
        async with http.ws_connect(ts.make_url("/ws")) as ws:
            await ws.send_json({"type": "start", "reference": _rgb_reference(ref), "sample_rate": rate,
                                "audio_format": "f32le", "video_format": "jpeg", "jpeg_quality": 90})
            await _expect(ws, "started")
            await ws.send_bytes(long32.astype("<f4").tobytes())
            frames = [decode_frame((await ws.receive(timeout=TIMEOUT)).data) for _ in range(3)]
            await ws.send_json({"type": "interrupt"})
            while True:                                   # frames already on their way, then the answer
                msg = await ws.receive(timeout=TIMEOUT)
                if msg.type == aiohttp.WSMsgType.TEXT:
                    assert json.loads(msg.data)["type"] == "interrupted", msg.data
                    break
                frames.append(decode_frame(msg.data))
            before = len(frames)
            await ws.send_bytes(short32.astype("<f4").tobytes())
            await ws.send_json({"type": "end_of_speech"})
            while len(frames) < before + n_short:
                frames.append(decode_frame((await ws.receive(timeout=TIMEOUT)).data))
            await ws.send_json({"type": "close"})
            await _expect(ws, "closed")                   # nothing else: no frame of the old utterance came late
            return frames, before

    frames, before = asyncio.run(_run_server(serve_engine, body))
    assert before < 500                                               # cut short
    idx = [h["index"] for h, _, _ in frames]
    assert idx[:before] == list(range(before))
    # the new utterance follows on: its first index is after the last frame the server took from the session,
    # which is the last one sent or one more (a frame taken as the interrupt came in is dropped, not sent late)
    assert idx[before] in (before, before + 1) and idx[before:] == list(range(idx[before], idx[before] + n_short))
    for h, img, audio in frames:
        assert h["video_format"] == "jpeg" and img.shape == (RES, RES, 3)
        assert audio.dtype == np.float32 and audio.shape == (P,)


def test_concurrent_starts_respect_max_sessions(serve_engine, monkeypatch):
    # sessions are opened in worker threads; two starts side by side on an engine with room for one must not
    # both pass its admission check while the first one's reference is still being prepared
    import lipforcing.engine.reference as reference

    real = reference.prepare_reference

    def slow_prepare(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "prepare_reference", slow_prepare)
    serve_engine.scheduler.configure(max_sessions=1)

    async def start(http, url):
        async with http.ws_connect(url) as ws:
            await ws.send_json({"type": "start", "reference": _rgb_reference(reference_frames(1))})
            msg = json.loads((await ws.receive(timeout=TIMEOUT)).data)
            started = msg["type"] == "started"
            await asyncio.sleep(0.2)                   # both answers in before either session closes
            return msg["type"] if started else msg["code"]

    async def body(ts, http, server):
        return await asyncio.gather(start(http, ts.make_url("/ws")), start(http, ts.make_url("/ws")))

    try:
        answers = asyncio.run(_run_server(serve_engine, body))
    finally:
        serve_engine.scheduler.configure(max_sessions=None)
    assert sorted(answers) == ["busy", "started"]
