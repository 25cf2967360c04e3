"""Leak tests: thousands of requests through the engine (and a shorter run through the real HTTP
server on loopback) leave nothing behind.

Each run mixes adapters (more than the byte budget holds, so adapters are evicted and re-uploaded),
base-only rows, greedy and seeded sampling, stop tokens, cancellations and a KV-cache budget. After a
warm-up and again at the end it asserts: the engine's queue, rows, request dict, cancel set and event
list are empty and its KV cache is released; the KV length and batch size never exceeded their bounds
while running; the bank's pages and slots are all accounted for (free + held == total, no duplicate)
and its used bytes never exceeded the budget; no ``Request``/``TokenEvent`` object survives; no
Python type's live-object count grew by more than a few; RSS grew less than a small bound.
The default test runs 2,000 requests; the ``slow`` one 10,000 (numbers printed).
"""

from __future__ import annotations

import collections
import copy
import gc
import os
import time

import pytest
import torch
from serving_helpers import tiny_base, write_peft_adapters

from lorakit.serving import AdapterBank, Request, ServingEngine
from lorakit.serving.engine import TokenEvent

CONFIGS = {f"ad{i}": dict(r=[2, 4, 8][i % 3], lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
                          if i % 2 == 0 else ["q_proj", "v_proj"]) for i in range(8)}
MAX_PROMPT, MAX_NEW = 12, 3


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def type_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__qualname__ for o in gc.get_objects())


def live(cls) -> int:
    gc.collect()
    return sum(isinstance(o, cls) for o in gc.get_objects())


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    base = tiny_base()
    root = tmp_path_factory.mktemp("leak")
    return base, root, write_peft_adapters(base, root, CONFIGS)


def make_engine(base, dirs, max_queue: int = 64):
    model = copy.deepcopy(base)
    # one 4-row page in every q,k,v,o of the 2 layers: 2 * 4 * (64 + 48 + 48 + 64) * 4 bytes = 7168; 4 pages
    # per module hold 2-4 of the adapters (they need 10 q_proj pages in all): rotation evicts and re-uploads
    bank = AdapterBank.for_model(model, budget_bytes=4 * 7168, page_rows=4)
    assert bank.num_pages == 4
    for name, d in dirs.items():
        bank.add(name, d)
    return ServingEngine(model, bank, max_batch=8, max_queue=max_queue, max_context=64,
                         kv_budget_bytes=5 * (MAX_PROMPT + MAX_NEW) * 2 * 2 * 2 * 8 * 4)  # 5 full rows


def check_idle(engine: ServingEngine) -> None:
    assert engine.idle
    assert not engine.queue and not engine.rows and not engine.requests
    assert not engine._cancelled and not engine._events
    assert engine.cache is None and engine.mask is None and engine.pos is None
    check_bank(engine.bank)
    assert all(h.in_use == 0 for h in engine.bank.adapters.values())


def check_bank(bank: AdapterBank) -> None:
    assert 0 <= bank.used_bytes <= bank.budget_bytes
    resident = [h for h in bank.adapters.values() if h.slot >= 0]
    assert len(bank._free_slots) + len(resident) == bank.max_slots
    assert len(set(bank._free_slots)) == len(bank._free_slots)
    assert bank.used_bytes == sum(h.nbytes_pages for h in resident)
    assert set(bank._lru) == {h.name for h in resident if not h.pinned and h.in_use == 0}
    for path, layer in bank.layers.items():
        held = [p for h in resident for p in h.pages.get(path, [])]
        assert len(held) + len(layer.free_pages) == bank.num_pages, path
        assert len(set(held) | set(layer.free_pages)) == bank.num_pages and 0 not in held, path
        assert layer.resident == sum(path in h.pages for h in resident)


def churn(engine: ServingEngine, n: int, seed: int = 0) -> dict:
    """Push ``n`` requests through ``engine`` (keeping the queue topped up); returns bounds seen."""
    g = torch.Generator().manual_seed(seed)
    names = [*engine.bank.adapters, None]
    submitted = done = 0
    max_kv_len = max_rows = max_kv_bytes = 0
    to_cancel: list[int] = []
    while done < n:
        while submitted < n and len(engine.queue) < 16:
            i = submitted
            plen = int(torch.randint(1, MAX_PROMPT + 1, (1,), generator=g))
            req = Request(prompt=torch.randint(3, 128, (plen,), generator=g).tolist(),
                          adapter=names[int(torch.randint(len(names), (1,), generator=g))],
                          max_new_tokens=int(torch.randint(1, MAX_NEW + 1, (1,), generator=g)),
                          temperature=0.0 if i % 3 else 0.8, seed=i if i % 3 == 0 else None,
                          top_k=20 if i % 6 == 0 else 0, stop_token_ids=(int(i % 100) + 3,) if i % 5 == 0 else ())
            rid = engine.submit(req)
            if i % 37 == 0:
                to_cancel.append(rid)
            submitted += 1
        for ev in engine.step():
            done += ev.finished
        for rid in to_cancel:
            engine.cancel(rid)
        to_cancel.clear()
        if engine.cache is not None:
            kv_len = engine.cache.layers[0].keys.shape[2]
            max_kv_len = max(max_kv_len, kv_len)
            max_rows = max(max_rows, len(engine.rows))
            max_kv_bytes = max(max_kv_bytes, sum(t.numel() * t.element_size() for layer in engine.cache.layers
                                                 for t in (layer.keys, layer.values)))
        assert engine.bank.used_bytes <= engine.bank.budget_bytes
    while not engine.idle:
        engine.step()
    return {"max_kv_len": max_kv_len, "max_rows": max_rows, "max_kv_bytes": max_kv_bytes}


def leak_run(base, dirs, n: int, warmup: int) -> dict:
    """Warm-up, then two halves of n/2 requests; the second half must add nothing (first-use caches of
    torch/transformers may fill during the first half: a bounded one-off, reported as ``grew_first``)."""
    engine = make_engine(base, dirs)
    churn(engine, warmup, seed=1)
    check_idle(engine)
    counts0, rss0, t0 = type_counts(), rss_bytes(), time.perf_counter()
    # objects other tests of this process still hold (module-scoped engines) are not this run's
    requests0, events0 = live(Request), live(TokenEvent)
    stats0 = dict(engine.bank.stats)
    b1 = churn(engine, n // 2, seed=2)
    check_idle(engine)
    counts1, rss1 = type_counts(), rss_bytes()
    b2 = churn(engine, n - n // 2, seed=3)
    seconds = time.perf_counter() - t0
    check_idle(engine)
    counts2, rss2 = type_counts(), rss_bytes()
    bounds = {k: max(b1[k], b2[k]) for k in b1}
    stats = {k: engine.bank.stats[k] - stats0[k] for k in stats0}
    out = {"requests": n, "seconds": seconds, "rss_growth_mb": (rss2 - rss0) / 2 ** 20,
           "rss_growth_second_half_mb": (rss2 - rss1) / 2 ** 20,
           "grew_first": {k: counts1[k] - counts0[k] for k in counts1 if counts1[k] - counts0[k] > 8},
           "grew_second": {k: counts2[k] - counts1[k] for k in counts2 if counts2[k] - counts1[k] > 8},
           "live_requests": live(Request) - requests0, "live_events": live(TokenEvent) - events0,
           "kv_budget_bytes": engine.kv_budget_bytes, "bank_budget_bytes": engine.bank.budget_bytes,
           "bank_hit_rate": stats["hits"] / max(1, stats["hits"] + stats["uploads"]), **stats, **bounds}
    assert bounds["max_kv_len"] <= MAX_PROMPT + MAX_NEW
    assert bounds["max_rows"] <= engine.max_batch
    assert bounds["max_kv_bytes"] <= engine.kv_budget_bytes
    assert out["live_requests"] == 0 and out["live_events"] == 0
    assert out["evictions"] > 0  # the budget really was tight
    assert not out["grew_second"], out
    assert all(v < 100 for v in out["grew_first"].values()), out  # bounded one-off, not per request
    return out


def test_engine_2000_requests_leave_nothing_behind(adapter_dirs):
    base, _, dirs = adapter_dirs
    out = leak_run(base, dirs, 2000, warmup=300)
    assert out["rss_growth_second_half_mb"] < 4 and out["rss_growth_mb"] < 8, out


@pytest.mark.slow
def test_engine_10000_requests_leave_nothing_behind(adapter_dirs):
    base, _, dirs = adapter_dirs
    out = leak_run(base, dirs, 10_000, warmup=1000)
    print("engine leak run:", out)
    assert out["rss_growth_second_half_mb"] < 4 and out["rss_growth_mb"] < 8, out


def http_run(base, root, dirs, n: int, warmup: int) -> dict:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from lorakit.serving.load import IdTokenizer, Sent, ServerThread, poisson_arrivals, run_load
    from lorakit.serving.server import create_app

    engine = make_engine(base, dirs, max_queue=256)  # > the 200 requests in flight at most: no 429
    app = create_app(engine, IdTokenizer(), adapter_root=root)
    runner = app.state.runner
    g = torch.Generator().manual_seed(0)
    names = [*dirs, "base"]

    def batch(count: int) -> list:
        times = poisson_arrivals(300.0, count, g)
        return [Sent(at=t, model=names[i % len(names)], max_tokens=1 + i % MAX_NEW,
                     prompt=torch.randint(3, 128, (1 + i % MAX_PROMPT,), generator=g).tolist())
                for i, t in enumerate(times)]

    # Closed connections leave uvicorn keep-alive timers in the event loop until they expire: a short keep-alive
    # and a wait past it before each count keep those out of the object counts (they are not per-request leaks).
    keep_alive = 0.3
    with ServerThread(app, keep_alive=keep_alive) as srv:
        for chunk in range(0, warmup, 200):
            sends = batch(min(200, warmup - chunk))
            run_load(srv.url, sends)
            assert all(s.status == 200 and s.error is None for s in sends), [s.error for s in sends if s.error][:3]
        del sends  # its prompts would be freed during the count below and hide a leak of the same size
        time.sleep(keep_alive + 0.7)
        check_idle(engine)
        assert not runner.listeners
        counts0, rss0, t0 = type_counts(), rss_bytes(), time.perf_counter()
        requests0 = live(Request)  # held by other tests of this process (module-scoped engines), not this run
        errors = ok = 0
        counts = []
        for half in (n // 2, n - n // 2):  # two equal halves: a leak grows in both, a one-off fill only once
            for chunk in range(0, half, 200):
                sends = batch(min(200, half - chunk))
                run_load(srv.url, sends)
                errors += sum(s.status != 200 or s.error is not None or s.tokens == 0 for s in sends)
                ok += sum(s.status == 200 and (s.tokens == s.max_tokens or s.finish_reason == "stop") for s in sends)
                del sends
            time.sleep(keep_alive + 0.7)
            check_idle(engine)
            assert not runner.listeners
            counts.append(type_counts())
        seconds = time.perf_counter() - t0
        counts1, counts2, rss1 = counts[0], counts[1], rss_bytes()
    # The server thread's event loop and HTTP stack hold a few dozen objects more or less from one count to the
    # next (timers, task wake-ups): a one-off, in one half. A per-request leak of even one object grows a type by
    # >= n/2 in each half, so a leak is a type that grew by more than n/8 in both halves.
    first = {k: counts1[k] - counts0[k] for k in counts1}
    second = {k: counts2[k] - counts1[k] for k in counts2}
    grew = {k: (first.get(k, 0), v) for k, v in second.items() if v > n // 8 and first.get(k, 0) > n // 8}
    return {"requests": n, "seconds": seconds, "errors": errors, "ok": ok,
            "grew_first_half": {k: v for k, v in first.items() if v > 8},
            "grew_second_half": {k: v for k, v in second.items() if v > 8},
            "rss_growth_mb": (rss1 - rss0) / 2 ** 20, "grew": grew,
            "live_requests": live(Request) - requests0}


def test_http_200_requests_leave_nothing_behind(adapter_dirs):
    base, root, dirs = adapter_dirs
    out = http_run(base, root, dirs, 200, warmup=100)
    assert out["errors"] == 0 and out["ok"] == 200 and out["live_requests"] == 0, out
    assert not out["grew"], out
    assert out["rss_growth_mb"] < 16, out


@pytest.mark.slow
def test_http_2000_requests_leave_nothing_behind(adapter_dirs):
    base, root, dirs = adapter_dirs
    out = http_run(base, root, dirs, 2000, warmup=400)
    print("http leak run:", out)
    assert out["errors"] == 0 and out["ok"] == 2000 and out["live_requests"] == 0, out
    assert not out["grew"], out
    assert out["rss_growth_mb"] < 16, out


def test_prefill_error_fails_the_joiners_and_frees_them(adapter_dirs):
    """An exception inside a prefill must finish those requests with an error event (the HTTP client
    gets a 503 instead of waiting forever) and release their adapters; out-of-vocabulary ids are
    refused at submit."""
    base, _, dirs = adapter_dirs
    engine = make_engine(base, dirs)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request(prompt=[5, 500], adapter="ad0"))
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request(prompt=["input_ids"], adapter="ad0"))
    running = engine.submit(Request(prompt=[5, 6], adapter="ad1", max_new_tokens=3))
    engine.step()  # ad1 is now decoding
    joiner = engine.submit(Request(prompt=[7, 8, 9], adapter="ad0", max_new_tokens=3))
    forward = engine.model.forward

    def boom(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    engine.model.forward = boom
    events = engine.step()
    engine.model.forward = forward
    assert any(e.request_id == joiner and e.finished and e.finish_reason == "error" for e in events)
    assert [r.id for r in engine.rows] == [running]
    assert engine.bank.adapters["ad0"].in_use == 0 and joiner not in engine.requests
    while not engine.idle:
        engine.step()
    check_idle(engine)
