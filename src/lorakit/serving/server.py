"""OpenAI-compatible HTTP server over the ServingEngine (FastAPI + uvicorn), vLLM-style adapter routes.

Routes: ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions`` (``"stream": true``
sends server-sent events); ``"model"`` is an adapter name, or the base model's id for no adapter;
``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` (path must lie inside the allowed
adapter directory) and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``; ``GET /health``.
Errors: malformed JSON or fields → 400, unknown adapter → 404, path outside the allowed directory →
403, adapter name taken → 409, over-long prompt → 400, full queue → 429, adapter memory exhausted
→ 503. A client that disconnects from a stream frees its batch row and its adapter.

Needs the ``serving`` extra (``pip install lorakit[serving]``: fastapi, uvicorn).
One engine thread runs ``engine.step()`` while there is work; HTTP handlers submit requests and
await their tokens on asyncio queues. Start it with
``python -m lorakit.serving.server --adapters DIR [--model PATH] [--port 8000]`` (the embedded
default model when ``--model`` is omitted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from lorakit.serving.bank import AdapterBank, AdapterBankError
from lorakit.serving.engine import QueueFullError, Request, ServingEngine, TokenEvent

MAX_TOKENS_DEFAULT = 16


class EngineRunner:
    """Runs the engine on a background thread; thread-safe submit/cancel/adapter changes."""

    def __init__(self, engine: ServingEngine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> tuple[int, asyncio.Queue]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self.lock:
            rid = self.engine.submit(request)
            self.listeners[rid] = (loop, queue)
        self.wake.set()
        return rid, queue

    def cancel(self, rid: int) -> None:
        with self.lock:
            self.engine.cancel(rid)
        self.wake.set()

    def _forget(self, rid: int) -> None:
        self.listeners.pop(rid, None)

    def _loop(self) -> None:
        while not self.stopping:
            self.wake.wait(0.1)
            while True:
                with self.lock:
                    if self.engine.idle:
                        self.wake.clear()
                        break
                    try:
                        events = self.engine.step()
                    except Exception as e:  # noqa: BLE001 - report to every waiting client, keep serving
                        events = [TokenEvent(r.id, None, True, "error") for r in self.engine.rows]
                        for r in self.engine.rows:
                            r.finish_reason, r.error = "error", f"engine error: {e}"
                        self.engine._drop_finished()
                    deliveries = []
                    for ev in events:
                        target = self.listeners.get(ev.request_id)
                        if target is not None:
                            deliveries.append((target, ev))
                        if ev.finished:
                            self._forget(ev.request_id)
                for (loop, queue), ev in deliveries:
                    loop.call_soon_threadsafe(queue.put_nowait, ev)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _as_int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise HTTPError(400, f"'{key}' must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _as_float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise HTTPError(400, f"'{key}' must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def create_app(engine: ServingEngine, tokenizer: Any, *, adapter_root: str | Path | None = None,
               base_name: str = "base"):
    """The FastAPI app. ``tokenizer`` needs ``encode(text) -> ids`` and ``decode(ids) -> str``
    (a Hugging Face tokenizer works; its chat template is used for chat when it has one)."""
    runner = EngineRunner(engine)
    root = Path(adapter_root).resolve() if adapter_root is not None else None
    app = FastAPI(title="lorakit serving")
    app.state.runner = runner

    @app.on_event("shutdown")
    def _shutdown() -> None:
        runner.stop()

    @app.exception_handler(HTTPError)
    async def _err(_: HTTPRequest, e: HTTPError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, status_code=e.status)

    async def body_of(request: HTTPRequest) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from e
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        return body

    def adapter_of(body: dict) -> str | None:
        model = body.get("model", base_name)
        if model in (None, base_name):
            return None
        if not isinstance(model, str) or model not in engine.bank.adapters:
            raise HTTPError(404, f"unknown model/adapter {model!r}; available: {[base_name, *engine.bank.adapters]}",
                            "not_found_error")
        return model

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # dict or BatchEncoding

    def chat_ids(messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects")
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # dict or BatchEncoding
        return encode("".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages) + "assistant:")

    def make_request(body: dict, prompt: list[int]) -> tuple[Request, list[str]]:
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise HTTPError(400, "'stop' must be a string or a list of strings")
        req = Request(prompt=prompt, adapter=adapter_of(body),
                      max_new_tokens=_as_int(body, "max_tokens", MAX_TOKENS_DEFAULT, 1, engine.max_context),
                      temperature=_as_float(body, "temperature", 1.0, 0.0, 10.0),
                      top_p=_as_float(body, "top_p", 1.0, 1e-6, 1.0), top_k=_as_int(body, "top_k", 0, 0, 1 << 20),
                      seed=body.get("seed") if isinstance(body.get("seed"), int) else None)
        return req, stop

    def submit(req: Request) -> tuple[int, asyncio.Queue]:
        try:
            rid, queue = runner.submit(req)
        except QueueFullError as e:
            raise HTTPError(429, str(e), "rate_limit_error") from e
        except AdapterBankError as e:
            raise HTTPError(404, str(e), "not_found_error") from e
        except ValueError as e:
            raise HTTPError(400, str(e)) from e
        return rid, queue

    async def tokens(rid: int, queue: asyncio.Queue, req: Request, stop: list[str]):
        """Yields (text delta, finish_reason or None); cancels the request if the consumer goes away."""
        text, sent, done, ids = "", 0, False, []
        try:
            while not done:
                ev: TokenEvent = await queue.get()
                done = ev.finished
                reason = ev.finish_reason if done else None
                if ev.token is not None:
                    ids.append(ev.token)  # not req.tokens: the engine thread may be ahead of this event
                    text = tokenizer.decode(ids)
                    hit = min((text.find(s) for s in stop if s and s in text), default=-1)
                    if hit >= 0:
                        text, reason = text[:hit], "stop"
                        if not done:  # free the row and adapter before answering
                            runner.cancel(rid)
                            while not (await queue.get()).finished:
                                pass
                            done = True
                if reason == "error":
                    raise HTTPError(503, req.error or reason, "server_error")
                yield text[sent:], reason
                sent = len(text)
        finally:
            if not done:
                runner.cancel(rid)  # client went away: free the row and the adapter

    def usage(req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
                "total_tokens": len(req.prompt) + len(req.tokens)}

    async def respond(body: dict, prompt: list[int], chat: bool):
        req, stop = make_request(body, prompt)
        rid, queue = submit(req)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        created, model = int(time.time()), body.get("model", base_name)
        obj = "chat.completion" if chat else "text_completion"

        def choice(delta: str, reason: str | None, streaming: bool) -> dict:
            if chat:
                key = "delta" if streaming else "message"
                return {"index": 0, key: {"role": "assistant", "content": delta}, "finish_reason": reason}
            return {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}

        if body.get("stream"):
            async def sse():
                async for delta, reason in tokens(rid, queue, req, stop):
                    chunk = {"id": cid, "object": obj + (".chunk" if chat else ""), "created": created,
                             "model": model, "choices": [choice(delta, reason, True)]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, reason = "", None
        async for delta, r in tokens(rid, queue, req, stop):
            text, reason = text + delta, r or reason
        return {"id": cid, "object": obj, "created": created, "model": model,
                "choices": [choice(text, reason, False)], "usage": usage(req)}

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        names = [base_name, *engine.bank.adapters]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "lorakit",
                                            "parent": None if n == base_name else base_name} for n in names]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await body_of(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            ids = encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            raise HTTPError(400, "'prompt' must be a non-empty string or a list of token ids")
        return await respond(body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await body_of(request)
        return await respond(body, chat_ids(body.get("messages")), chat=True)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HTTPRequest):
        body = await body_of(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str):
            raise HTTPError(400, "'lora_name' and 'lora_path' (strings) are required")
        if name == base_name:
            raise HTTPError(400, f"{name!r} is the base model's name")
        resolved = Path(path).resolve()
        if root is None or not resolved.is_relative_to(root):
            raise HTTPError(403, f"adapter path {path!r} is outside the allowed adapter directory", "permission_error")
        try:
            with runner.lock:
                if name in engine.bank.adapters:
                    raise HTTPError(409, f"adapter {name!r} is already loaded")
                engine.bank.add(name, resolved)
        except HTTPError:
            raise
        except (AdapterBankError, ValueError, OSError) as e:
            raise HTTPError(400, f"cannot load adapter {name!r}: {e}") from e
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HTTPRequest):
        body = await body_of(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in engine.bank.adapters:
            raise HTTPError(404, f"unknown adapter {name!r}", "not_found_error")
        try:
            with runner.lock:
                engine.bank.remove(name)
        except AdapterBankError as e:
            raise HTTPError(409, str(e)) from e
        return {"status": "ok", "lora_name": name}

    return app


def build_server(model_path: str | None, adapter_dirs: list[str], *, budget_bytes: int = 512 << 20,
                 max_batch: int = 32, max_queue: int = 256, targets: list[str] | None = None, kv: str = "dense",
                 unified_budget_bytes: int | None = None):
    """(app, engine) for a model path (default: the embedded model) and adapter folders (each a
    PEFT/lorakit adapter, named after its folder, or a folder of them, named after their subfolders);
    the first adapter folder is the allowed root."""
    from lorakit.io.peft import load_adapter_dirs
    from lorakit.models import load_model
    from lorakit.serving.bank import DEFAULT_SERVING_TARGETS

    model, tokenizer = load_model(model_path) if model_path else load_model()
    states = {}
    for d in adapter_dirs:
        for name, st in load_adapter_dirs(d).items():
            name = Path(d).resolve().name if name == "default" else name  # a folder that is one adapter
            if name in states:
                raise ValueError(f"two adapters named {name!r} (from {d}); adapter names must be unique")
            states[name] = st
    wanted = set(targets or DEFAULT_SERVING_TARGETS)
    for st in states.values():
        wanted |= {m.rpartition(".")[2] for m in st.modules}
    bank = AdapterBank.for_model(model, targets=wanted, budget_bytes=budget_bytes)
    for name, st in states.items():
        bank.add(name, st)
    engine = ServingEngine(model, bank, max_batch=max_batch, max_queue=max_queue, kv=kv,
                           unified_budget_bytes=unified_budget_bytes,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    return create_app(engine, tokenizer, adapter_root=adapter_dirs[0] if adapter_dirs else None), engine


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="OpenAI-compatible multi-LoRA server")
    p.add_argument("--model", default=None, help="HF folder/GGUF; default: the embedded model")
    p.add_argument("--adapters", nargs="*", default=[], help="adapter folders (first = allowed load root)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--budget-mb", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--kv", choices=("dense", "paged"), default="dense", help="KV cache: padded batch or paged")
    p.add_argument("--unified-budget-mb", type=int, default=None,
                   help="one budget for adapter and KV pages (S-LoRA unified paging; needs --kv paged)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $LORAKIT_THREADS or torch's)")
    args = p.parse_args(argv)
    if args.unified_budget_mb is not None and args.kv != "paged":
        p.error("--unified-budget-mb needs --kv paged")
    import uvicorn

    from lorakit.models import set_threads

    set_threads(args.threads)
    app, _ = build_server(args.model, args.adapters, budget_bytes=args.budget_mb << 20, max_batch=args.max_batch,
                          kv=args.kv, unified_budget_bytes=None if args.unified_budget_mb is None
                          else args.unified_budget_mb << 20)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
