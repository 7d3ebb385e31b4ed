"""llama.cpp's own programs (llama-server, llama-completion, ...) built with the `slicegpt` architecture.

`scripts/build_llama_cpp.sh` builds them from the same patched llama.cpp tree as the bindings into
``build/llama.cpp/bin`` (or set ``SLICEGPT_LLAMA_CPP_BIN`` to another folder holding such a build).  A
``slicegpt-version`` file in that folder marks the build; stock programs on PATH are never used, since they
refuse `slicegpt` files.

`SAME_AS_BINDINGS` makes a program compute what `LlamaCppModel` computes (f32 KV cache, flash attention
off), so that greedy continuations can be compared token for token, and lets its worker threads sleep
between graphs as the bindings' do: the programs keep a thread pool that busy-waits for work by default
(`--poll 50`), and on a CPU shared with other processes those spinning threads starve each other (measured
on the 2-core machine under load: llama-completion 0.3 tokens/s with the default, 3.6 with `--poll 0`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from slicegpt_export.errors import SliceGPTError

logger = logging.getLogger(__name__)

BIN_ENV = "SLICEGPT_LLAMA_CPP_BIN"
VERSION_FILE = "slicegpt-version"
#: the repository's build folder, for a source checkout (editable install)
REPO_BIN = Path(__file__).resolve().parents[3] / "build" / "llama.cpp" / "bin"
#: options under which the programs compute what LlamaCppModel computes, with threads that sleep when idle
SAME_AS_BINDINGS = ("--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32", "--poll", "0")
LISTENING = re.compile(r"listening on (http://\S+)")


def tools_dir() -> Path:
    """The folder of the slicegpt build of llama.cpp's programs; a one-line error when there is none."""
    folder = Path(os.environ[BIN_ENV]) if os.environ.get(BIN_ENV) else REPO_BIN
    if not (folder / VERSION_FILE).is_file():
        raise SliceGPTError(f"llama.cpp's programs with the slicegpt architecture are not built in {folder}: "
                            "run scripts/build_llama_cpp.sh")  # fmt: skip
    return folder


def tool_path(name: str) -> Path:
    """One program of the build, e.g. tool_path("llama-server")."""
    path = tools_dir() / name
    if not os.access(path, os.X_OK):
        raise SliceGPTError(f"{path} is missing: run scripts/build_llama_cpp.sh")
    return path


def run_tool(name: str, args: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a program to completion (bounded); stdout and stderr captured; a one-line error when it fails."""
    cmd = [str(tool_path(name)), *args]
    try:
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise SliceGPTError(f"{name} did not finish within {timeout:g} s") from exc
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise SliceGPTError(f"{name} failed with exit status {done.returncode}: {tail}")
    return done


def complete(
    model: Path, prompt: str, n_predict: int, *, n_ctx: int = 512, threads: int | None = None, timeout: float = 120
) -> str:
    """The greedy continuation of `prompt` by llama-completion (single-prompt mode, no chat template, all tokens)."""
    args = ["--model", str(model), "--prompt", prompt, "--n-predict", str(n_predict), "--ctx-size", str(n_ctx),
            "--threads", str(threads or os.cpu_count()), "--temp", "0", "--ignore-eos", "--no-conversation",
            "--no-display-prompt", "--no-escape", "--no-warmup", *SAME_AS_BINDINGS]  # fmt: skip
    # stdout is the generated text, then the two newlines llama-completion prints when generation ends
    return run_tool("llama-completion", args, timeout=timeout).stdout.removesuffix("\n\n")


class LlamaServer:
    """llama-server on a free loopback port over one GGUF file, stopped on exit (also on failure).

    ``with LlamaServer(path) as server: server.post("/v1/chat/completions", {...})``.  The server binds
    port 0 (the kernel picks a free port) and the address is read from its log; startup, every request
    and the shutdown are bounded in time.
    """

    def __init__(self, model: Path, *, log: Path, n_ctx: int = 512, threads: int | None = None, startup_timeout: float = 60,
                 extra_args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.model, self.log = Path(model), Path(log)
        self.args = ["--model", str(self.model), "--host", "127.0.0.1", "--port", "0", "--ctx-size", str(n_ctx),
                     "--threads", str(threads or os.cpu_count()), "--parallel", "1", "--no-warmup",
                     *SAME_AS_BINDINGS, *extra_args]  # fmt: skip
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        with self.log.open("wb") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen([str(tool_path("llama-server")), *self.args], stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            self.url = self._wait_for_address()
            self._wait_for_health()
        except BaseException:
            self.stop()
            raise
        logger.info("llama-server (pid %d) serves %s at %s", self.process.pid, self.model.name, self.url)

    def _log_tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])

    def _wait_for_address(self) -> str:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if found := LISTENING.search(self.log.read_text(errors="replace")):
                return found.group(1)
            if self.process.poll() is not None:
                raise SliceGPTError(f"llama-server exited with status {self.process.returncode}: {self._log_tail()}")
            time.sleep(0.1)
        raise SliceGPTError(f"llama-server did not start within {self.startup_timeout:g} s: {self._log_tail()}")

    def _wait_for_health(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/health", timeout=5).get("status") == "ok":
                    return
            except (OSError, SliceGPTError):  # not ready yet (503 while loading) or a refused connection
                pass
            if self.process.poll() is not None:
                raise SliceGPTError(f"llama-server exited with status {self.process.returncode}: {self._log_tail()}")
            time.sleep(0.1)
        raise SliceGPTError(f"llama-server was not healthy within {self.startup_timeout:g} s: {self._log_tail()}")

    def request(self, path: str, body: dict[str, Any] | None = None, *, timeout: float = 120) -> dict[str, Any]:
        """GET (no body) or POST (a JSON body) one endpoint; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise SliceGPTError(f"llama-server {path}: HTTP {exc.code}: {exc.read()[:300].decode(errors='replace')}") from exc

    def get(self, path: str, *, timeout: float = 120) -> dict[str, Any]:
        return self.request(path, timeout=timeout)

    def post(self, path: str, body: dict[str, Any], *, timeout: float = 120) -> dict[str, Any]:
        return self.request(path, body, timeout=timeout)

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM to the server's process group, SIGKILL after `timeout` seconds; waits until it is gone."""
        if self.process is None or self.process.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                logger.warning("llama-server (pid %d) ignored %s", self.process.pid, sig.name)
        self.process.wait()
