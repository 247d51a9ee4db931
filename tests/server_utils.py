"""A real OpenAI-compatible vLLM server for the tests (CPU route, loopback only).

`VllmServer` starts `vllm-script serve` (the README's CPU command) in its own process
group on 127.0.0.1 and a free port, waits for `/health`, and kills the whole group on
`stop()`. Use one per test module (start-up takes ~40-60 s on 2 cores).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
VLLM_SCRIPT = Path(sys.executable).with_name("vllm-script")
# the README's CPU serve flags, as used by every server test
SERVE_ARGS = (
    "--trust-request-mm-kwargs",
    "--enforce-eager",
    "--max-model-len",
    "2048",
    "--limit-mm-per-prompt",
    '{"image": 2}',
    "--seed",
    "0",
)
SERVER_SETTINGS = {"method": "script", "budget": 64, "max_budget": 256}
N = 576  # visual tokens per image of the tiny checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """The server exited or never became healthy; the message carries its log tail."""


class VllmServer:
    def __init__(
        self,
        model_dir: Path | str,
        *,
        settings: dict | str | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_dir = str(model_dir)
        self.port = free_port()
        self.base_url = f"http://{HOST}:{self.port}"
        args = [str(VLLM_SCRIPT), "serve", self.model_dir, "--host", HOST]
        args += ["--port", str(self.port), *SERVE_ARGS, *extra_args]
        if settings is not None:
            raw = settings if isinstance(settings, str) else json.dumps(settings)
            args += ["--hf-overrides", json.dumps({"script": json.loads(raw)})]
        self.args = args
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_PLUGINS": "script"}
        self.env.update(env or {})
        self.log_path = Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.startup_metrics = ""

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 300) -> VllmServer:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,  # own process group: stop() kills every child
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"server exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self.healthy():
                # what /metrics said before any request: start-up traffic must not count
                self.startup_metrics = self.get("/metrics")
                return self
            time.sleep(1)
        self.stop()
        raise ServerFailed(f"server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, grace: float = 20) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; make sure no worker of the group lingers
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
        self.proc = None

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.healthy()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=10) as r:
            return r.read().decode()

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=self.base_url + "/v1", api_key="none", max_retries=0, **kwargs
        )

    def async_client(self, **kwargs):
        import openai

        return openai.AsyncOpenAI(
            base_url=self.base_url + "/v1", api_key="none", max_retries=0, **kwargs
        )


def run_server_expecting_failure(
    model_dir: Path | str, settings: dict | str, timeout: float = 300
) -> str:
    """Start a server that should refuse to start; returns its log (raises if it serves)."""
    server = VllmServer(model_dir, settings=settings)
    try:
        server.start(timeout=timeout)
    except ServerFailed as exc:
        return str(exc) + "\n" + server.log_text()
    finally:
        server.stop()
    raise AssertionError(f"server started with bad settings {settings!r}")


_URL_CACHE: dict[tuple[int, int, int], str] = {}


def image_url(seed: int, size: int = 336, height: int | None = None) -> str:
    """A base64 PNG data URL of `vllm_script.testing.random_image(seed)`, `size` px wide
    and `height` (default: `size`) px high."""
    key = (seed, size, size if height is None else height)
    if key not in _URL_CACHE:
        from vllm_script.testing import random_image

        buf = io.BytesIO()
        random_image(*key).save(buf, format="PNG")
        _URL_CACHE[key] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return _URL_CACHE[key]


def messages(question: str, images: list[int] | tuple[int, ...] = (), urls=()) -> list[dict]:
    """One user turn: the images (seeds or raw URLs) first, then the question."""
    parts = [{"type": "image_url", "image_url": {"url": image_url(s)}} for s in images]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def script_kwargs(**settings) -> dict:
    """`extra_body` carrying per-request pruning settings."""
    return {"mm_processor_kwargs": {"script": settings}}
