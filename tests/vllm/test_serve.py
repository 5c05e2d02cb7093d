"""``vllm serve`` on 127.0.0.1 with the plugin, answered by concurrent HTTP requests: each request
alone (one at a time), then all at once in shuffled order, then again after a server restart:
the same tokens and logprob bits. The control (plugin off, greedy only: its seeded sampling with
chunked prefill kills the engine, see test_engine.py) differs between alone and concurrent."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import SKIP_REASON, engine_env
from .engine_run import prompts_for

pytest.importorskip("vllm", reason=SKIP_REASON)

PROMPTS = prompts_for(512, 16, seed=1)
MAX_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``vllm serve`` process on loopback, stopped (terminate, then kill) on exit."""

    def __init__(self, model: Path, plugin: str | None, log: Path) -> None:
        self.port = _free_port()
        self.model = str(model)
        command = [
            str(Path(sys.executable).with_name("vllm")), "serve", self.model, "--host", "127.0.0.1",
            "--port", str(self.port), "--skip-tokenizer-init", "--dtype", "bfloat16", "--enforce-eager",
            "--max-model-len", "512", "--max-num-batched-tokens", "64", "--block-size", "32",
            "--enable-prefix-caching", "--seed", "0",
        ]  # fmt: skip
        env = engine_env(plugin)
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # a server as deployed: the engine in its own process
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"vllm serve exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.__exit__(None, None, None)
        raise AssertionError("vllm serve did not answer /health within 300 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def complete(self, i: int, seeded: bool) -> tuple[list[int], list[float]]:
        body = {
            "model": self.model, "prompt": PROMPTS[i], "max_tokens": MAX_TOKENS, "ignore_eos": True,
            "return_token_ids": True, "return_tokens_as_token_ids": True, "logprobs": 0,
            "temperature": 0.8 if seeded else 0.0,
        }  # fmt: skip
        if seeded:
            body.update(seed=2000 + i, top_k=40)
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=300) as r:
            choice = json.loads(r.read())["choices"][0]
        return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def _alone_and_concurrent(server: Server, modes: list[bool]) -> tuple[dict, dict]:
    jobs = [(i, seeded) for seeded in modes for i in range(len(PROMPTS))]
    alone = {job: server.complete(*job) for job in jobs}
    shuffled = jobs[:]
    random.Random(3).shuffle(shuffled)
    with ThreadPoolExecutor(max_workers=len(shuffled)) as pool:
        concurrent = dict(zip(shuffled, pool.map(lambda job: server.complete(*job), shuffled), strict=True))
    return alone, concurrent


def _identical(a: dict, b: dict) -> int:
    return sum(a[job] == b[job] for job in a)


def test_served_plugin_on_concurrent_and_restarted_identical(tiny_model, tmp_path):
    with Server(tiny_model, "invariant", tmp_path / "serve-on.log") as server:
        alone, concurrent = _alone_and_concurrent(server, [False, True])
    with Server(tiny_model, "invariant", tmp_path / "serve-on-2.log") as server:
        _, restarted = _alone_and_concurrent(server, [False, True])
    print(f"served, plugin on: concurrent {_identical(alone, concurrent)}/{len(alone)}, "
          f"after restart {_identical(alone, restarted)}/{len(alone)} identical to alone")  # fmt: skip
    assert _identical(alone, concurrent) == len(alone)
    assert _identical(alone, restarted) == len(alone)


def test_served_plugin_off_control_differs(tiny_model, tmp_path):
    with Server(tiny_model, None, tmp_path / "serve-off.log") as server:
        alone, concurrent = _alone_and_concurrent(server, [False])
    print(f"served, plugin off (greedy): concurrent {_identical(alone, concurrent)}/{len(alone)} identical to alone")
    assert _identical(alone, concurrent) < len(alone)
