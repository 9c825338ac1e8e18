"""Helpers shared by the endpoint tests: sample media, a loopback media server, and a stand-in for a Serve
handle that calls the model deployment class in this process (so the HTTP layer can be tested without Ray)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import soundfile as sf
from PIL import Image


def png(width: int = 300, height: int = 200, seed: int = 3, noise: bool = True) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8) if noise else np.full(shape, 90, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def wav(seconds: float, rate: int = 16_000) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class MediaServer:
    """A loopback HTTP server holding one PNG; it records every path it is asked for."""

    def __init__(self, body: bytes) -> None:
        requests: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", "/image.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.requests = requests
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---- the model deployment in-process ----


class _Call:
    """Awaitable like a DeploymentResponse, cancellable."""

    def __init__(self, coroutine) -> None:
        self._coroutine = coroutine
        self._task: asyncio.Task | None = None

    def __await__(self):
        self._task = asyncio.ensure_future(self._coroutine)
        return self._task.__await__()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        else:
            self._coroutine.close()


class _Method:
    def __init__(self, function, streaming: bool) -> None:
        self.function = function
        self.streaming = streaming

    def remote(self, *args):
        result = self.function(*args)
        return result if self.streaming else _Call(result)


def loaded(server, timeout_s: float = 120.0):
    """The model server once its background load is over (loaded or failed)."""
    deadline = time.monotonic() + timeout_s
    while server.loading:
        assert time.monotonic() < deadline, f"the model did not load within {timeout_s:g} s"
        time.sleep(0.05)
    return server


class InProcessHandle:
    """The slice of DeploymentHandle that ServeModelBackend uses, calling a ModelServer in this process."""

    def __init__(self, server, streaming: bool = False) -> None:
        self.server = server
        self.streaming = streaming

    def options(self, stream: bool = False):
        return InProcessHandle(self.server, streaming=stream)

    def __getattr__(self, name: str):
        return _Method(getattr(self.server, name), self.streaming)
