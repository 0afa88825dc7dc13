"""The aiohttp application of ``lipforcing serve``: ``/ws`` (the streaming protocol of
:mod:`lipforcing.serve.protocol`), ``/health`` (JSON) and ``/metrics`` (Prometheus).

One engine serves every connection; each connection holds at most one session at a time.  The event loop never
computes: a session is opened (reference decoding, face detection) in a worker thread, audio goes to
``session.apush_audio`` (which waits, without blocking the loop, while the session's buffer is full: TCP
backpressure for a client that sends faster than real time), frames come from ``session.aframes()`` and are encoded
(JPEG) in a worker thread.  A client that disconnects, cleanly or not, has
its session closed at once, which drops its queued chunks.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time

import numpy as np
from aiohttp import WSMsgType, web

from lipforcing.serve.metrics import prometheus_text
from lipforcing.serve.protocol import ProtocolError, decode_pcm, encode_frame, parse_control, parse_start

logger = logging.getLogger("lipforcing.serve")

__all__ = ["LipSyncServer", "AvatarStore", "serve"]

_AVATAR_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".png", ".jpg", ".jpeg", ".npy", ".safetensors")


class AvatarStore:
    """Prepared avatars: id -> reference.  ``source``: None, a dict {id: (N, H, W, 3) uint8 array or a file
    path}, or a folder whose files ``<id>.mp4`` / ``.png`` / ``.jpg`` / ``.npy`` (and other video containers) are
    the avatars, and ``<id>.safetensors`` a reference written by ``engine.prepare(video, path)`` (its face track is
    read back instead of detected; other ``.safetensors`` files are not avatars).  Files are decoded on first use
    and kept; :meth:`get` returns the frames, or the path of a prepared reference file."""

    def __init__(self, source=None):
        self._lock = threading.Lock()
        self._cache: dict[str, np.ndarray] = {}
        self._paths: dict[str, str] = {}
        if source is None:
            return
        if isinstance(source, dict):
            for k, v in source.items():
                if isinstance(v, np.ndarray):
                    self._cache[k] = v
                else:
                    self._paths[k] = os.fspath(v)
            return
        folder = os.fspath(source)
        if not os.path.isdir(folder):
            raise ValueError(f"avatars {folder!r}: not a folder")
        from lipforcing.engine.reference import is_reference_file

        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            path = os.path.join(folder, name)
            if ext.lower() == ".safetensors" and not is_reference_file(path):
                continue
            if ext.lower() in _AVATAR_EXTENSIONS:
                self._paths.setdefault(stem, path)

    def ids(self) -> list[str]:
        return sorted(set(self._cache) | set(self._paths))

    def get(self, avatar: str) -> np.ndarray | str:
        with self._lock:
            if avatar in self._cache:
                return self._cache[avatar]
            path = self._paths.get(avatar)
        if path is None:
            raise ProtocolError("unknown_avatar", f"no prepared avatar {avatar!r} (this server has "
                                                  f"{', '.join(self.ids()) or 'none'})")
        if path.lower().endswith(".safetensors"):
            return path                  # engine.prepare(path) reads it (and its source video) back
        frames = _read_reference_file(path)
        with self._lock:
            self._cache[avatar] = frames
        return frames


def _read_reference_file(path: str) -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npy":
        arr = np.load(path, allow_pickle=False)
        return arr if arr.ndim == 4 else arr[None]
    if ext in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"), dtype=np.uint8)[None].copy()
    from lipforcing.media import read_video

    return read_video(path)[0]


class LipSyncServer:
    """The server's state: the engine, the avatars and the counters.  :meth:`app` builds the aiohttp app.

    push_timeout : seconds an audio message may wait for room in a full session buffer before the client gets a
    ``buffer_full`` error (the client must read its frames).  max_message_bytes : largest WebSocket message
    (reference uploads)."""

    def __init__(self, engine, *, avatars=None, push_timeout: float = 30.0, max_message_bytes: int = 64 << 20):
        self.engine = engine
        self.avatars = avatars if isinstance(avatars, AvatarStore) else AvatarStore(avatars)
        self.push_timeout = push_timeout
        self.max_message_bytes = max_message_bytes
        self.connections = 0
        self.counters = {"connections_total": 0, "frames_sent_total": 0, "protocol_errors_total": 0,
                         "sessions_refused_total": 0}
        self.started = time.time()
        self._prepared: dict = {}                  # avatar id -> engine.prepare's Reference (face track done once)
        self._preparing: dict[str, threading.Lock] = {}
        self._prepared_lock = threading.Lock()
        # sessions are opened one at a time: engine.session's admission check and the new session's registration
        # are not atomic, and two starts opened side by side would both pass a full engine's check
        self.open_lock = asyncio.Lock()

    def prepared_avatar(self, avatar: str):
        """The avatar's reference as ``engine.prepare`` returns it, computed once per id (face detection and
        tracking of full frames run at the first start only) and shared by the sessions.  Blocking: call it in a
        worker thread."""
        with self._prepared_lock:
            if avatar in self._prepared:
                return self._prepared[avatar]
            lock = self._preparing.setdefault(avatar, threading.Lock())
        with lock:
            with self._prepared_lock:
                if avatar in self._prepared:
                    return self._prepared[avatar]
            source = self.avatars.get(avatar)
            try:
                ref = self.engine.prepare(source)
            except (TypeError, ValueError) as exc:
                raise ProtocolError("bad_reference", f"avatar {avatar!r}: {exc}") from None
            with self._prepared_lock:
                self._prepared[avatar] = ref
            return ref

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_message_bytes)
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _health(self, request: web.Request) -> web.Response:
        e = self.engine
        st = e.stats()
        ok = not e.scheduler.closed
        body = {"status": "ok" if ok else "closed", "sessions": st["sessions"], "connections": self.connections,
                "queued_chunks": st["queued_chunks"], "capacity": st["capacity"], "device": str(e.device),
                "resolution": list(e.resolution), "avatars": self.avatars.ids(),
                "uptime_s": round(time.time() - self.started, 3)}
        return web.json_response(body, status=200 if ok else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        counters = {f"lipforcing_{k}": (k.replace("_", " ").replace(" total", "") + ".", v)
                    for k, v in self.counters.items()}
        counters["lipforcing_connections"] = ("Open WebSocket connections.", self.connections)
        text = prometheus_text(self.engine, counters)
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=self.max_message_bytes, heartbeat=30.0)
        await ws.prepare(request)
        self.connections += 1
        self.counters["connections_total"] += 1
        conn = _Connection(self, ws)
        try:
            await conn.run()
        finally:
            await conn.end_session()
            self.connections -= 1
        return ws


class _Connection:
    def __init__(self, server: LipSyncServer, ws: web.WebSocketResponse):
        self.server, self.ws = server, ws
        self.session = None
        self.start = None
        self.sender: asyncio.Task | None = None
        # an interrupt and a frame being sent exclude each other, and a frame taken before an interrupt is dropped:
        # after {"type": "interrupted"} the client gets frames of the new utterance only
        self.send_lock = asyncio.Lock()
        self.interrupts = 0
        self.session_id = 0

    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                await self._guard(self._control(msg.data))
            elif msg.type == WSMsgType.BINARY:
                await self._guard(self._audio(msg.data))
            elif msg.type == WSMsgType.ERROR:
                break

    async def _guard(self, coro) -> None:
        try:
            await coro
        except ProtocolError as exc:
            self.server.counters["protocol_errors_total"] += 1
            await self._send_text(exc.to_message())

    async def _send_text(self, text: str) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                pass

    async def _control(self, text: str) -> None:
        msg = parse_control(text)
        kind = msg["type"]
        if kind == "start":
            await self._start(msg)
            return
        if self.session is None:
            raise ProtocolError("not_started", f"'{kind}' needs a session: send a start message first")
        if kind == "end_of_speech":
            self.session.end_of_speech()
        elif kind == "interrupt":
            async with self.send_lock:
                self.interrupts += 1
                self.session.interrupt()
                await self._send_text(json.dumps({"type": "interrupted", "session": self.session_id}))
        elif kind == "close":
            await self.end_session()
            await self._send_text(json.dumps({"type": "closed", "session": self.session_id}))

    async def _start(self, msg: dict) -> None:
        from lipforcing.engine import AdmissionError

        if self.session is not None:
            raise ProtocolError("already_started", "this connection has a session; send close first")
        req = await asyncio.to_thread(parse_start, msg)
        reference = req.reference
        if reference is None:
            reference = await asyncio.to_thread(self.server.prepared_avatar, req.avatar)
        try:
            # a worker thread: a full-frame reference runs face detection and tracking here (seconds), which must
            # not hold up the other connections' frames
            async with self.server.open_lock:
                session = await asyncio.to_thread(self.server.engine.session, reference,
                                                  sample_rate=req.sample_rate, seed=req.seed)
        except AdmissionError as exc:
            self.server.counters["sessions_refused_total"] += 1
            raise ProtocolError("busy", str(exc)) from None
        except (TypeError, ValueError) as exc:
            raise ProtocolError("bad_reference", str(exc)) from None
        self.session, self.start = session, req
        self.session_id += 1
        e = self.server.engine
        self.sender = asyncio.create_task(self._send_frames(session, req))
        h, w = session.reference.shape[1:3]          # the frames sent: the crops, or full frames (face pasted back)
        await self._send_text(json.dumps({
            "type": "started", "session": self.session_id, "width": int(w), "height": int(h),
            "fps": e.fps, "sample_rate": e.sample_rate, "samples_per_frame": e.samples_per_frame,
            "video_format": req.video_format, "audio_format": req.audio_format}))

    async def _audio(self, data: bytes) -> None:
        if self.session is None:
            raise ProtocolError("not_started", "audio before start: send a start message first")
        pcm = decode_pcm(data, self.start.audio_format)
        try:
            await self.session.apush_audio(pcm, timeout=self.server.push_timeout)
        except BufferError as exc:
            raise ProtocolError("buffer_full", f"{exc} (read the frames the server sends)") from None
        except RuntimeError as exc:      # closed meanwhile
            raise ProtocolError("not_started", str(exc)) from None

    async def _send_frames(self, session, req) -> None:
        try:
            async for frame in session.aframes():
                taken = self.interrupts          # no await since aframes() took the frame
                async with self.send_lock:
                    if self.interrupts != taken:
                        continue                 # taken before an interrupt that has been answered: stale
                    data = encode_frame(frame, video_format="rgb", audio_format=req.audio_format) \
                        if req.video_format == "rgb" else await asyncio.to_thread(
                            encode_frame, frame, video_format="jpeg", audio_format=req.audio_format,
                            jpeg_quality=req.jpeg_quality)
                    await self.ws.send_bytes(data)
                self.server.counters["frames_sent_total"] += 1
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception as exc:       # a failed chunk step: tell the client, keep the connection
            logger.error("lipforcing serve: session %d failed: %s", self.session_id, exc)
            await self._send_text(ProtocolError("internal", f"the session failed: {exc}").to_message())
        finally:
            if self.ws.closed and not session.closed:
                session.close()          # the client is gone: free the session now

    async def end_session(self) -> None:
        """Close the session (drops its queued work) and stop its sender."""
        session, sender = self.session, self.sender
        self.session, self.sender = None, None
        if session is not None:
            session.close()
        if sender is not None:
            sender.cancel()
            try:
                await sender
            except (asyncio.CancelledError, Exception):
                pass


def serve(engine, *, host: str = "127.0.0.1", port: int = 8765, avatars=None, print_fn=print) -> None:
    """Run the server until interrupted (Ctrl-C); closes the engine's sessions on the way out."""
    server = LipSyncServer(engine, avatars=avatars)
    print_fn(f"lipforcing serve: ws://{host}:{port}/ws  (health http://{host}:{port}/health, metrics /metrics)")
    try:
        web.run_app(server.app(), host=host, port=port, print=None, handle_signals=True)
    finally:
        engine.close()
