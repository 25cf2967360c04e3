"""Load generation against the OpenAI-compatible server: a loopback uvicorn thread, Poisson arrivals,
Zipf adapter popularity, streamed requests timed for time-to-first-token and end-to-end latency.

Used by ``bench/serving_load/run.py`` and the leak tests (tests/serving/test_serving_leak.py).
Loopback only: ``ServerThread`` binds 127.0.0.1 on a free port. Needs the ``serving`` extra plus
``httpx`` for the client.

- Arrivals: a Poisson process of rate λ, i.e. exponential inter-arrival gaps with mean 1/λ.
- Popularity: Zipf over N adapters, P(adapter k) ∝ 1/k^s (k = 1..N; s = 0 is uniform), the model
  S-LoRA's evaluation uses for skewed adapter popularity (Sheng et al., MLSys 2024, arXiv 2311.03285,
  Sec. 7: power-law distributed requests across adapters).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


def zipf_probs(n: int, exponent: float) -> torch.Tensor:
    """P(k) ∝ 1 / k^exponent over k = 1..n (exponent 0: uniform)."""
    w = torch.arange(1, n + 1, dtype=torch.float64).pow(-float(exponent))
    return w / w.sum()


def poisson_arrivals(rate: float, count: int, generator: torch.Generator) -> list[float]:
    """Arrival times (s) of ``count`` requests of a Poisson process with ``rate`` requests/s."""
    gaps = torch.empty(count, dtype=torch.float64).exponential_(rate, generator=generator)
    return torch.cumsum(gaps, 0).tolist()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """``with ServerThread(app) as srv:`` runs uvicorn on 127.0.0.1:<free port> in a daemon thread;
    ``srv.url`` is its base URL. Exiting shuts the server down (and the app's shutdown hooks run)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
                 keep_alive: float = 5.0) -> None:
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        # keep_alive: seconds an idle connection stays open (uvicorn's timeout_keep_alive); each one holds an
        # event-loop timer until then, which object-count leak checks must wait out
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", access_log=False,
                                lifespan="on", timeout_keep_alive=keep_alive)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorakit-uvicorn", daemon=True)
        self.timeout = timeout

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > self.timeout:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=self.timeout)


@dataclass
class Sent:
    """One request of a load run and what the client measured (seconds since the run started)."""

    at: float
    model: str
    prompt: list[int]
    max_tokens: int
    status: int = 0
    ttft: float | None = None  # first streamed token chunk - send time
    latency: float | None = None  # [DONE] - send time
    tokens: int = 0
    error: str | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)


async def _one(client, url: str, s: Sent, t_start: float) -> None:
    body = {"model": s.model, "prompt": s.prompt, "max_tokens": s.max_tokens, "temperature": 0,
            "stream": True}
    await asyncio.sleep(max(0.0, t_start + s.at - time.perf_counter()))
    sent = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            s.status = resp.status_code
            if resp.status_code != 200:
                s.error = (await resp.aread()).decode(errors="replace")[:300]
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                choice = json.loads(data)["choices"][0]
                if choice.get("text"):
                    if s.ttft is None:
                        s.ttft = time.perf_counter() - sent
                    s.tokens += 1
                    s.text.append(choice["text"])
                s.finish_reason = choice.get("finish_reason") or s.finish_reason
            s.latency = time.perf_counter() - sent
    except Exception as e:  # noqa: BLE001 - record and go on: a load test counts errors
        s.error = f"{type(e).__name__}: {e}"


async def _run(url: str, sends: Sequence[Sent], timeout: float, max_connections: int) -> float:
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t_start = time.perf_counter()
        await asyncio.gather(*(_one(client, url, s, t_start) for s in sends))
        return time.perf_counter() - t_start


def run_load(url: str, sends: Sequence[Sent], *, timeout: float = 120.0, max_connections: int = 512) -> float:
    """Send every request at its ``at`` time (streamed completions, greedy); fills the ``Sent``
    records in place; returns the wall time from the first scheduled send to the last answer."""
    return asyncio.run(_run(url, sends, timeout, max_connections))


class IdTokenizer:
    """Tokenizer stand-in for token-id prompts on random models: each token decodes to one
    ``" t<id>"`` piece, so every streamed chunk carries exactly one token."""

    chat_template = None

    def encode(self, text: str) -> list[int]:
        return [3 + (b % 200) for b in text.encode()]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(f" t{int(i)}" for i in ids)
