"""OpenAI-compatible HTTP server over the ServingEngine (FastAPI + uvicorn), vLLM-style adapter routes.

Routes: ``GET /v1/models``; ``POST /v1/completions`` and ``/v1/chat/completions`` (``"stream": true``
sends server-sent events); ``"model"`` is an adapter name, or the base model's id for no adapter;
``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` (a relative path resolves against the
adapter root; the path must lie inside it) and ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``, both
off unless enabled (``--enable-lora-loading``); ``GET /health``.

Text: incremental detokenization (``serving.detok``) never sends half of a multi-byte character and
never sends part of a stop string; the text equals decoding the generated ids (cut at a stop string).

Errors: always ``{"error": {"message", "type", "code"}}`` JSON, never with absolute server paths.
Malformed JSON, fields, unsupported fields (``n`` > 1, ``best_of``, ``logprobs``, ``echo``, penalties,
``logit_bias``), wrong types, invalid Unicode, a prompt/stop/messages over the limits, a chat template
that raises, a request larger than the KV budget → 400; missing/wrong API key → 401; runtime loading
disabled, foreign Origin, path outside the adapter root → 403; unknown adapter or route → 404; adapter
name taken, adapter in use by running or queued requests, ``--max-loras`` reached → 409; body too large
→ 413; non-JSON content type → 415; full queue → 429; engine failures → 500. An error after a stream
started is an SSE ``data: {"error": ...}`` event followed by ``data: [DONE]``. A client that disconnects
(streaming or not) has its request cancelled: its batch row and adapter are freed.

Checks before any work (:class:`ServerLimits`, the ``Guard`` middleware): Host (DNS rebinding; loopback
names by default on a loopback bind) and Origin (browsers: none allowed by default), the API key
(``--api-key``/``$LORAKIT_API_KEY``, ``Authorization: Bearer``), JSON content type, body size
(``--max-body-mb``, 2 MB), prompt characters (32 per context token), at most 16 stop strings of 256
characters; tokenization and chat templates run in a worker thread, off the event loop. Memory:
``--max-model-len``, ``--kv-budget-mb`` (1024 MB by default), ``--max-loras``.

Needs the ``serving`` extra (``pip install lorakit[serving]``: fastapi, uvicorn).
One engine thread runs ``engine.step()`` while there is work; HTTP handlers submit requests and
await their tokens on asyncio queues. Start it with
``python -m lorakit.serving.server --adapters DIR [--model PATH] [--port 8000]`` (the embedded
default model when ``--model`` is omitted) or ``lorakit serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.serving.bank import AdapterBank, AdapterBankError
from lorakit.serving.detok import IncrementalDecoder, StopMatcher
from lorakit.serving.engine import QueueFullError, Request, ServingEngine, TokenEvent

MAX_TOKENS_DEFAULT = 16
DISCONNECT_POLL_S = 0.1  # how often a waiting non-streaming request checks that its client is still there


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
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, ev)
                    except RuntimeError:  # the client's event loop is closed: nobody reads; free its row
                        with self.lock:
                            if not ev.finished:
                                self.engine.cancel(ev.request_id)
                            self._forget(ev.request_id)

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=5)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.kind = kind or _KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")


_KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}

_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)+([^\s'\":,)]*)")


def scrub_paths(message: str, root: Path | None = None) -> str:
    """An error message without absolute server paths: paths inside the adapter root are shown relative
    to it, any other absolute path as ``…/<last part>``."""
    if root is not None:
        message = message.replace(str(root) + "/", "").replace(str(root), ".")
    return _ABS_PATH.sub(lambda m: "…/" + m.group(1), message)


def error_body(status: int, message: str, kind: str | None = None) -> dict[str, Any]:
    """The one error format of every response: ``{"error": {"message", "type", "code"}}``."""
    kind = kind or _KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": status}}


@dataclass
class ServerLimits:
    """What the server accepts. ``max_prompt_chars`` None: 32 characters per token of the context
    (checked before tokenization); ``allowed_hosts`` None: any Host header."""

    max_body_bytes: int = 2 << 20
    max_prompt_chars: int | None = None
    max_messages: int = 1024
    max_stop: int = 16
    max_stop_chars: int = 256
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] | None = None
    enable_lora_loading: bool = False
    max_loras: int | None = None


class Guard:
    """ASGI middleware in front of every route: Host/Origin checks (a browser page on another site
    cannot drive the server), the API key, JSON content type on POST, the body-size cap (the body is
    read here, bounded, and replayed), and a JSON 500 for any exception a route lets escape."""

    def __init__(self, app: Any, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    @staticmethod
    async def _send_error(send: Any, status: int, message: str) -> None:
        payload = json.dumps(error_body(status, message)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})

    def _refusal(self, scope: dict[str, Any]) -> tuple[int, str] | None:
        lim = self.limits
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if lim.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0] or host
            if name.lower() not in {h.lower() for h in lim.allowed_hosts} and host.lower() not in lim.allowed_hosts:
                return 400, "invalid Host header (not one this server answers to)"
        origin = headers.get("origin")
        if origin is not None and origin not in lim.allowed_origins:
            return 403, "cross-origin requests are not allowed (Origin not in the server's allowed origins)"
        path = scope.get("path", "")
        if lim.api_key is not None and path.startswith("/v1") and scope.get("method") != "OPTIONS":  # preflight
            auth = headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {lim.api_key}".encode()):
                return 401, "missing or wrong API key (send 'Authorization: Bearer <key>')"
        if scope.get("method") == "POST":
            ctype = headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype != "application/json":
                return 415, "POST bodies must be JSON (Content-Type: application/json)"
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > lim.max_body_bytes):
                return 413, f"request body larger than {lim.max_body_bytes} bytes"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await self._send_error(send, *refusal)
            return
        origin = next((v for k, v in scope.get("headers", []) if k.lower() == b"origin"), None)
        cors = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")] if origin is not None else []
        if origin is not None and scope.get("method") == "OPTIONS":  # preflight of an allowed origin
            await send({"type": "http.response.start", "status": 204, "headers": [
                *cors, (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"authorization, content-type"),
                (b"access-control-max-age", b"600")]})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope.get("method") == "POST":
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.limits.max_body_bytes:
                    await self._send_error(send, 413, f"request body larger than {self.limits.max_body_bytes} bytes")
                    return
                chunks.append(chunk)
                more = message.get("more_body", False)
            replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

            async def receive_replayed() -> dict[str, Any]:
                return replay.pop() if replay else await receive()
        else:
            receive_replayed = receive
        started = False

        async def send_tracked(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            await self.app(scope, receive_replayed, send_tracked)
        except Exception as e:  # noqa: BLE001 - the one JSON format, never a plain-text 500
            if started:
                raise
            await self._send_error(send, 500, f"internal server error ({type(e).__name__})")


class ClientGone(Exception):
    """The HTTP client disconnected while its request was generating."""


def _as_int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise HTTPError(400, f"'{key}' must be an integer in [{lo}, {hi}], got {_short(v)}")
    return v


def _as_float(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise HTTPError(400, f"'{key}' must be a number in [{lo}, {hi}], got {_short(v)}")
    return float(v)


def _as_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise HTTPError(400, f"'{key}' must be true or false, got {_short(v)}")
    return v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_text(text: str, what: str) -> None:
    """Refuse strings that are not valid Unicode (a lone surrogate, as JSON's \\ud800 escapes allow)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise HTTPError(400, f"{what} is not valid Unicode (a lone surrogate at index {e.start})") from None


SEED_MAX = (1 << 64) - 1
# fields of the OpenAI API this server does not implement: refused instead of silently ignored
UNSUPPORTED = {"n": (None, 1), "best_of": (None, 1), "logprobs": (None, False), "top_logprobs": (None, 0),
               "echo": (None, False), "suffix": (None, ""), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "logit_bias": (None, {})}


def _check_unsupported(body: dict) -> None:
    for key, allowed in UNSUPPORTED.items():
        v = body.get(key)
        if not any(v is a or (type(v) is type(a) and v == a) for a in allowed):
            if key in ("presence_penalty", "frequency_penalty") and type(v) is float and v == 0.0:
                continue
            raise HTTPError(400, f"'{key}' = {_short(v)} is not supported by this server (allowed: "
                                 f"{', '.join(json.dumps(a) for a in allowed)}); "
                                 + ("send separate requests instead" if key in ("n", "best_of") else "omit it"))


def create_app(engine: ServingEngine, tokenizer: Any, *, adapter_root: str | Path | None = None,
               base_name: str = "base", limits: ServerLimits | None = None, enable_lora_loading: bool | None = None,
               api_key: str | None = None):
    """The FastAPI app. ``tokenizer`` needs ``encode(text) -> ids`` and ``decode(ids) -> str``
    (a Hugging Face tokenizer works; its chat template is used for chat when it has one).

    ``limits`` (:class:`ServerLimits`) sets the checks; ``enable_lora_loading`` and ``api_key`` override
    its fields. Runtime adapter loading is off unless enabled."""
    limits = limits or ServerLimits()
    if enable_lora_loading is not None:
        limits = replace(limits, enable_lora_loading=enable_lora_loading)
    if api_key is not None:
        limits = replace(limits, api_key=api_key)
    max_prompt_chars = limits.max_prompt_chars or 32 * engine.max_context
    runner = EngineRunner(engine)
    root = Path(adapter_root).resolve() if adapter_root is not None else None
    app = FastAPI(title="lorakit serving")
    app.state.runner = runner
    app.state.limits = limits
    app.add_middleware(Guard, limits=limits)

    @app.on_event("shutdown")
    def _shutdown() -> None:
        runner.stop()

    @app.exception_handler(HTTPError)
    async def _err(_: HTTPRequest, e: HTTPError):
        return JSONResponse(error_body(e.status, e.message, e.kind), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _route_err(_: HTTPRequest, e: StarletteHTTPException):  # unknown route, wrong method
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    async def body_of(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"malformed JSON body: {e}") from e
        except RecursionError:
            raise HTTPError(400, "malformed JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the JSON body must be an object")
        return body

    def adapter_of(body: dict) -> str | None:
        model = body.get("model", base_name)
        if model in (None, base_name):
            return None
        if not isinstance(model, str) or model not in engine.bank.adapters:
            raise HTTPError(404, f"unknown model/adapter {_short(model)}; available: "
                                 f"{[base_name, *list(engine.bank.adapters)[:20]]}")
        return model

    def encode(text: str) -> list[int]:
        ids = tokenizer.encode(text)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # dict or BatchEncoding

    async def encode_off_loop(text: str) -> list[int]:
        try:
            return await run_in_threadpool(encode, text)
        except Exception as e:  # noqa: BLE001 - the tokenizer refused the text
            raise HTTPError(400, f"cannot tokenize the prompt ({type(e).__name__}: {scrub_paths(str(e))})") from e

    async def chat_ids(messages: Any) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role", "user"), str)
                for m in messages):
            raise HTTPError(400, "'messages' must be a non-empty list of {role, content} objects (strings)")
        if len(messages) > limits.max_messages:
            raise HTTPError(400, f"too many messages ({len(messages)} > {limits.max_messages})")
        chars = sum(len(m["content"]) + len(m.get("role", "user")) for m in messages)
        if chars > max_prompt_chars:
            raise HTTPError(400, f"the messages are too long ({chars} characters > {max_prompt_chars}; the context "
                                 f"length is {engine.max_context} tokens)")
        for i, m in enumerate(messages):
            _check_text(m["content"], f"messages[{i}].content")
            _check_text(m.get("role", "user"), f"messages[{i}].role")
        if getattr(tokenizer, "chat_template", None):
            def template() -> list[int]:
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # dict or BatchEncoding

            try:
                return await run_in_threadpool(template)
            except Exception as e:  # noqa: BLE001 - a template that raises (e.g. roles it refuses)
                raise HTTPError(400, f"the chat template refused the messages ({type(e).__name__}: "
                                     f"{scrub_paths(str(e))})") from e
        return await encode_off_loop("".join(f"{m.get('role', 'user')}: {m['content']}\n" for m in messages)
                                     + "assistant:")

    def parse_stop(body: dict) -> list[str]:
        stop = body.get("stop")
        if stop is None:
            return []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise HTTPError(400, "'stop' must be a string or a list of strings")
        if len(stop) > limits.max_stop:
            raise HTTPError(400, f"too many stop strings ({len(stop)} > {limits.max_stop})")
        for i, s in enumerate(stop):
            if len(s) > limits.max_stop_chars:
                raise HTTPError(400, f"stop string {i} is too long ({len(s)} > {limits.max_stop_chars} characters)")
            _check_text(s, f"stop string {i}")
        return stop

    def parse_options(body: dict) -> dict[str, Any]:
        """Every sampling field, strictly typed, before any tokenization."""
        _check_unsupported(body)
        return {"adapter": adapter_of(body), "stream": _as_bool(body, "stream"), "stop": parse_stop(body),
                "max_new_tokens": _as_int(body, "max_tokens", MAX_TOKENS_DEFAULT, 1, engine.max_context),
                "temperature": _as_float(body, "temperature", 1.0, 0.0, 10.0),
                "top_p": _as_float(body, "top_p", 1.0, 1e-6, 1.0), "top_k": _as_int(body, "top_k", 0, 0, 1 << 20),
                "seed": None if body.get("seed") is None else _as_int(body, "seed", 0, 0, SEED_MAX)}

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

    async def tokens(rid: int, queue: asyncio.Queue, req: Request, stop: list[str], gone: Any = None):
        """Yields (text delta, finish_reason or None): incremental detokenization (no partial characters)
        and stop strings (no partial stop string is ever sent); cancels the request if the consumer goes
        away, or (``gone``: an async predicate, polled while waiting) the client disconnects."""
        decoder, matcher, done = IncrementalDecoder(tokenizer), StopMatcher(stop), False
        checked = time.monotonic()
        try:
            while not done:
                ev: TokenEvent | None
                if gone is None:
                    ev = await queue.get()
                else:  # poll the client while waiting, and between tokens at the same pace
                    try:
                        ev = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        ev = None
                    if ev is None or time.monotonic() - checked >= DISCONNECT_POLL_S:
                        checked = time.monotonic()
                        if await gone():
                            raise ClientGone()
                    if ev is None:
                        continue
                done = ev.finished
                reason = ev.finish_reason if done else None
                if reason == "error":
                    raise HTTPError(req.error_status, scrub_paths(req.error or "generation failed", root))
                text = decoder.push(ev.token) if ev.token is not None else ""
                if done:
                    text += decoder.flush()
                delta, stopped = matcher.feed(text)
                if stopped:
                    reason = "stop"
                    if not done:  # free the row and adapter before answering
                        runner.cancel(rid)
                        while not (await queue.get()).finished:
                            pass
                        done = True
                elif done:
                    delta += matcher.flush()
                if delta or reason:
                    yield delta, reason
        finally:
            if not done:
                runner.cancel(rid)  # client went away: free the row and the adapter

    def usage(req: Request) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.tokens),
                "total_tokens": len(req.prompt) + len(req.tokens)}

    async def respond(request: HTTPRequest, body: dict, opts: dict[str, Any], prompt: list[int], chat: bool):
        req = Request(prompt=prompt, adapter=opts["adapter"], max_new_tokens=opts["max_new_tokens"],
                      temperature=opts["temperature"], top_p=opts["top_p"], top_k=opts["top_k"], seed=opts["seed"])
        stop = opts["stop"]
        rid, queue = submit(req)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
        created, model = int(time.time()), body.get("model", base_name)
        obj = "chat.completion" if chat else "text_completion"

        def choice(delta: str, reason: str | None, streaming: bool) -> dict:
            if chat:
                key = "delta" if streaming else "message"
                return {"index": 0, key: {"role": "assistant", "content": delta}, "finish_reason": reason}
            return {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}

        if opts["stream"]:
            stream = tokens(rid, queue, req, stop)
            try:  # an error before the first token still gets its status code
                first: tuple[str, str | None] | None = await stream.__anext__()
            except StopAsyncIteration:
                first = None

            def event(delta: str, reason: str | None) -> str:
                chunk = {"id": cid, "object": obj + (".chunk" if chat else ""), "created": created,
                         "model": model, "choices": [choice(delta, reason, True)]}
                return f"data: {json.dumps(chunk)}\n\n"

            async def sse():
                try:
                    if first is not None:
                        yield event(*first)
                    async for delta, reason in stream:
                        yield event(delta, reason)
                except HTTPError as e:  # after the stream started: an error event, then [DONE]
                    yield f"data: {json.dumps(error_body(e.status, e.message, e.kind))}\n\n"
                except Exception as e:  # noqa: BLE001
                    yield f"data: {json.dumps(error_body(500, f'internal server error ({type(e).__name__})'))}\n\n"
                finally:
                    await stream.aclose()
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream")
        text, reason = "", None
        try:
            async for delta, r in tokens(rid, queue, req, stop, gone=request.is_disconnected):
                text, reason = text + delta, r or reason
        except ClientGone:
            return JSONResponse(error_body(499, "client closed the request"), status_code=499)
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
        opts = parse_options(body)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            if len(prompt) > max_prompt_chars:
                raise HTTPError(400, f"the prompt is too long ({len(prompt)} characters > {max_prompt_chars}; "
                                     f"the context length is {engine.max_context} tokens)")
            _check_text(prompt, "the prompt")
            ids = await encode_off_loop(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            if len(prompt) > engine.max_context:
                raise HTTPError(400, f"the prompt ({len(prompt)} tokens) exceeds the context length "
                                     f"{engine.max_context}")
            ids = prompt
        else:
            raise HTTPError(400, "'prompt' must be a non-empty string or a list of token ids")
        return await respond(request, body, opts, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        body = await body_of(request)
        opts = parse_options(body)
        return await respond(request, body, opts, await chat_ids(body.get("messages")), chat=True)

    def loading_enabled() -> None:
        if not limits.enable_lora_loading:
            raise HTTPError(403, "runtime adapter loading is disabled; start the server with "
                                 "--enable-lora-loading to allow it")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: HTTPRequest):
        loading_enabled()
        body = await body_of(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise HTTPError(400, "'lora_name' and 'lora_path' (strings) are required")
        _check_text(name, "'lora_name'")
        _check_text(path, "'lora_path'")
        if "\x00" in path or "\x00" in name:
            raise HTTPError(400, "'lora_name' and 'lora_path' must not contain NUL bytes")
        if len(name) > 256 or len(path) > 4096:
            raise HTTPError(400, "'lora_name' (256) or 'lora_path' (4096 characters) is too long")
        if name == base_name:
            raise HTTPError(400, f"{name!r} is the base model's name")
        if root is None:
            raise HTTPError(403, "this server has no adapter directory to load from")
        candidate = Path(path) if Path(path).is_absolute() else root / path  # relative: under the adapter root
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError, ValueError) as e:
            raise HTTPError(400, f"invalid 'lora_path' ({type(e).__name__})") from e
        if not resolved.is_relative_to(root):
            raise HTTPError(403, "adapter path is outside the allowed adapter directory", "permission_error")
        shown = str(resolved.relative_to(root)) or "."
        if not resolved.exists():
            raise HTTPError(404, f"adapter path {shown!r} does not exist in the adapter directory")
        if name in engine.bank.adapters:
            raise HTTPError(409, f"adapter {name!r} is already loaded")
        if limits.max_loras is not None and len(engine.bank.adapters) >= limits.max_loras:
            raise HTTPError(409, f"{len(engine.bank.adapters)} adapters are loaded, the server's limit "
                                 f"(--max-loras {limits.max_loras}); unload one first")
        try:
            from lorakit.io.peft import load_state

            state = await run_in_threadpool(load_state, resolved)  # file reads off the event loop
            with runner.lock:
                if name in engine.bank.adapters:
                    raise HTTPError(409, f"adapter {name!r} is already loaded")
                engine.bank.add(name, state)
        except HTTPError:
            raise
        except Exception as e:  # noqa: BLE001 - a bad file or one that does not fit the base: the client's input
            raise HTTPError(400, f"cannot load adapter {name!r} from {shown!r}: "
                                 f"{scrub_paths(str(e), root) or type(e).__name__}") from e
        return {"status": "ok", "lora_name": name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: HTTPRequest):
        loading_enabled()
        body = await body_of(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in engine.bank.adapters:
            raise HTTPError(404, f"unknown adapter {_short(name)}", "not_found_error")
        try:
            with runner.lock:
                engine.remove_adapter(name)  # refused while running or queued requests use it
        except AdapterBankError as e:
            raise HTTPError(409, str(e)) from e
        return {"status": "ok", "lora_name": name}

    return app


KV_BUDGET_MB_DEFAULT = 1024  # the dense/paged KV cache's default byte budget (admission waits beyond it)


def build_server(model_path: str | None, adapter_dirs: list[str], *, budget_bytes: int = 512 << 20,
                 max_batch: int = 32, max_queue: int = 256, targets: list[str] | None = None, kv: str = "dense",
                 unified_budget_bytes: int | None = None, max_model_len: int | None = None,
                 kv_budget_bytes: int | None = KV_BUDGET_MB_DEFAULT << 20, limits: ServerLimits | None = None,
                 device: str = "auto"):
    """(app, engine) for a model path (default: the embedded model) and adapter folders (each a
    PEFT/lorakit adapter, named after its folder, or a folder of them, named after their subfolders);
    the first adapter folder is the allowed root.

    ``max_model_len``: the context length served (at most the model's); ``kv_budget_bytes``: the KV
    cache's budget (ignored with ``unified_budget_bytes``, which covers KV and adapter pages; None =
    unbounded); ``limits``: the request checks (:class:`ServerLimits`, with ``max_loras``); ``device``:
    ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N`` (a missing CUDA device is refused)."""
    from lorakit.io.peft import load_adapter_dirs
    from lorakit.models import load_model
    from lorakit.serving.bank import DEFAULT_SERVING_TARGETS

    limits = limits or ServerLimits()
    import torch

    from lorakit.train.trainer import parse_device

    dev = parse_device(device) or (torch.device("cuda") if torch.cuda.is_available() else None)
    model, tokenizer = load_model(model_path, device=dev) if model_path else load_model(device=dev)
    model_len = getattr(model.config, "max_position_embeddings", None)
    if max_model_len is not None and (max_model_len < 2 or (model_len is not None and max_model_len > model_len)):
        raise ValueError(f"max_model_len must be in [2, {model_len}] (the model's context), got {max_model_len}")
    states = {}
    for d in adapter_dirs:
        for name, st in load_adapter_dirs(d).items():
            name = Path(d).resolve().name if name == "default" else name  # a folder that is one adapter
            if name in states:
                raise ValueError(f"two adapters named {name!r} (from {d}); adapter names must be unique")
            states[name] = st
    if limits.max_loras is not None and len(states) > limits.max_loras:
        raise ValueError(f"{len(states)} adapters given, more than max_loras={limits.max_loras}")
    wanted = set(targets or DEFAULT_SERVING_TARGETS)
    for st in states.values():
        wanted |= {m.rpartition(".")[2] for m in st.modules}
    bank = AdapterBank.for_model(model, targets=wanted, budget_bytes=budget_bytes)
    for name, st in states.items():
        bank.add(name, st)
    engine = ServingEngine(model, bank, max_batch=max_batch, max_queue=max_queue, kv=kv,
                           unified_budget_bytes=unified_budget_bytes, max_context=max_model_len,
                           kv_budget_bytes=None if unified_budget_bytes is not None else kv_budget_bytes,
                           pad_token_id=getattr(tokenizer, "pad_token_id", None) or 0)
    return create_app(engine, tokenizer, adapter_root=adapter_dirs[0] if adapter_dirs else None,
                      limits=limits), engine


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible multi-LoRA server")
    p.add_argument("--model", default=None, help="HF folder/GGUF; default: the embedded model")
    p.add_argument("--adapters", nargs="*", default=[], help="adapter folders (first = allowed load root)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--budget-mb", type=int, default=512, help="device pool for adapter weights, in MB")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--kv", choices=("dense", "paged"), default="dense", help="KV cache: padded batch or paged")
    p.add_argument("--unified-budget-mb", type=int, default=None,
                   help="one budget for adapter and KV pages (S-LoRA unified paging; needs --kv paged)")
    p.add_argument("--kv-budget-mb", type=int, default=KV_BUDGET_MB_DEFAULT,
                   help="KV cache budget in MB; requests wait for room beyond it (0 = unbounded)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length served (default: the model's)")
    p.add_argument("--max-loras", type=int, default=None, help="most adapters loaded at once (runtime loads refused)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $LORAKIT_API_KEY, else none)")
    p.add_argument("--enable-lora-loading", action="store_true",
                   help="allow the runtime /v1/load_lora_adapter and /v1/unload_lora_adapter routes")
    p.add_argument("--allowed-origin", action="append", default=[],
                   help="a browser Origin allowed to call the server (repeatable; default: none)")
    p.add_argument("--allowed-host", action="append", default=[],
                   help="Host header values served (repeatable; default: loopback names when bound to loopback)")
    p.add_argument("--max-body-mb", type=float, default=2.0, help="largest request body, in MB")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $LORAKIT_THREADS or torch's)")
    return p


def limits_from_args(args: argparse.Namespace) -> ServerLimits:
    import os

    hosts: tuple[str, ...] | None = tuple(args.allowed_host) or None
    if hosts is None and args.host in LOOPBACK:  # DNS rebinding: a loopback server answers loopback names only
        hosts = LOOPBACK
    return ServerLimits(max_body_bytes=int(args.max_body_mb * (1 << 20)),
                        api_key=args.api_key or os.environ.get("LORAKIT_API_KEY") or None,
                        allowed_origins=tuple(args.allowed_origin), allowed_hosts=hosts,
                        enable_lora_loading=args.enable_lora_loading, max_loras=args.max_loras)


def main(argv: list[str] | None = None) -> None:
    p = server_parser()
    args = p.parse_args(argv)
    if args.unified_budget_mb is not None and args.kv != "paged":
        p.error("--unified-budget-mb needs --kv paged")
    for flag in ("budget_mb", "max_batch", "kv_budget_mb", "max_body_mb"):
        if getattr(args, flag) < (0 if flag == "kv_budget_mb" else 1e-9):
            p.error(f"--{flag.replace('_', '-')} must be positive")
    if args.max_loras is not None and args.max_loras < 1:
        p.error("--max-loras must be >= 1")
    import uvicorn

    from lorakit.models import set_threads

    set_threads(args.threads)
    app, _ = build_server(args.model, args.adapters, budget_bytes=args.budget_mb << 20, max_batch=args.max_batch,
                          kv=args.kv, unified_budget_bytes=None if args.unified_budget_mb is None
                          else args.unified_budget_mb << 20, max_model_len=args.max_model_len,
                          kv_budget_bytes=(args.kv_budget_mb << 20) or None, limits=limits_from_args(args),
                          device=args.device)
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
