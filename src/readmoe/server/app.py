"""The OpenAI-compatible HTTP server over an engine backend.

The asyncio side only translates: it tokenizes, validates (a user's mistake is a
4xx with OpenAI's error body, never a 500), hands requests to the backend, and
turns the tokens it pushes back into JSON or Server-Sent Events. A request whose
client goes away is cancelled, which frees its KV cache within one step.

The backend is one `EngineThread` (`readmoe serve`), or, scaled out, the Ray
ingress's `RemoteEngines`, which routes each request to an engine replica.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from ..serving.engine_thread import QueueFull, RequestOutput
from ..serving.request import Logprob, SamplingParams
from .metrics import ServerMetrics
from .protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest,
                       _Sampling)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 499: "client_closed_request",
               500: "internal_error", 503: "service_unavailable"}
DOCUMENTED = {code: {"model": ErrorResponse, "description": text} for code, text in (
    (400, "invalid request: the message names the field"), (401, "missing or wrong API key"),
    (404, "unknown model"), (503, "queue full, draining, or the engine is down"))}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class Choice:
    """One prompt's stream: what has been sent, and the incremental detokenization state."""

    index: int
    prompt_ids: list[int]
    prompt_text: str
    arrival: float
    handle: object = None  # the backend's reference, for cancel
    ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)
    experts: list[int] = field(default_factory=list)
    stops: tuple[str, ...] = ()
    sent: str = ""
    finish_reason: str | None = None
    last_token_at: float | None = None
    echoed: bool = False


class Backend(Protocol):
    """What the routes need of the engines behind them: `EngineThread` is one in this process; the Ray ingress's
    `RemoteEngines` routes to replicas. `submit` validates (UserError) or refuses (QueueFull) at once; events reach
    `sink` from any thread, a request's last one with `finished`."""

    tok: object
    max_len: int | None
    vocab_size: int
    num_experts: int
    alive: bool

    def start(self): ...
    def stop(self, timeout: float | None = None) -> None: ...
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink, stream: bool = True) -> object: ...
    def cancel(self, handle) -> None: ...
    def attach_metrics(self, metrics: ServerMetrics) -> None: ...
    def refresh_metrics(self, metrics: ServerMetrics) -> None: ...


class Server:
    """State shared by the routes: the backend, the tokenizer, names, metrics, the drain flag."""

    def __init__(self, backend: Backend, served_model_name: str, api_key: str | None = None):
        self.et = backend
        self.tok = backend.tok
        self.name, self.api_key = served_model_name, api_key
        self.metrics = ServerMetrics(served_model_name, backend.num_experts)
        backend.attach_metrics(self.metrics)
        self.draining = False
        self.max_len = backend.max_len

    # ------------------------------------------------------------ request -> engine
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"model '{model}' does not exist; this server serves '{self.name}' (see /v1/models)",
                           "model")

    def sampling(self, req: _Sampling, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None):
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported; send the request n times (with different seeds)", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", "stop")
        seed = req.seed if req.seed is not None else random.getrandbits(31)
        return SamplingParams(max_tokens=max_tokens or max(1, (self.max_len or 2048) // 2),
                              temperature=req.temperature, top_p=req.top_p, top_k=max(0, req.top_k or 0),
                              stop_token_ids=tuple(req.stop_token_ids or ()), stop=tuple(stop),
                              ignore_eos=req.ignore_eos, seed=seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    def submit(self, prompts: list[tuple[list[int], str]], params: SamplingParams, stream: bool = True):
        """Queue every prompt; returns the choices and the queue their events arrive on. With `stream` False the
        backend may deliver a request's tokens in one event at the end (a remote replica then sends one message)."""
        if self.draining or not self.et.alive:
            self.metrics.rejected.labels(self.name, "unavailable").inc()
            raise APIError(503, "the server is shutting down" if self.draining else "the engine is not running")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        choices = [Choice(i, ids, text, now, stops=params.stop) for i, (ids, text) in enumerate(prompts)]
        try:
            for c in choices:
                c.handle = self.et.submit(c.prompt_ids, params,
                                          lambda ev, i=c.index: loop.call_soon_threadsafe(q.put_nowait, (i, ev)),
                                          stream=stream)
        except (UserError, QueueFull) as e:
            for c in choices:
                if c.handle is not None:
                    self.et.cancel(c.handle)
            full = isinstance(e, QueueFull)
            self.metrics.rejected.labels(self.name, "queue_full" if full else "invalid").inc()
            raise APIError(503 if full else 400, str(e), None if full else "prompt") from None
        for c in choices:
            self.metrics.prompt_tokens.labels(self.name).inc(len(c.prompt_ids))
        return choices, q

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        try:
            return self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        except Exception:  # noqa: BLE001 - e.g. lone surrogates, which are no valid UTF-8
            raise APIError(400, f"{param} is not valid UTF-8 text", param) from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        V = self.et.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < V for t in ids):
            raise APIError(400, f"token ids must lie in [0, {V})", param)
        return ids

    def cancel(self, choices: list[Choice]) -> None:
        for c in choices:
            if c.handle is not None and c.finish_reason is None:
                self.et.cancel(c.handle)

    # ------------------------------------------------------------ engine -> response
    def advance(self, c: Choice, ev: RequestOutput) -> str:
        """Take an event; return the text that may be sent now (held back: a partial UTF-8 character, and the tail
        that could still become a stop string)."""
        now = time.monotonic()
        if ev.new_ids:  # an event folding several steps got its first token sum(gaps) ago
            first_at = now - sum(ev.gaps)
            hist = self.metrics.ttft if c.last_token_at is None else self.metrics.itl
            hist.labels(self.name).observe(max(0.0, first_at - (c.last_token_at or c.arrival)))
            for g in ev.gaps:
                self.metrics.itl.labels(self.name).observe(g)
            c.last_token_at = now
        c.ids += ev.new_ids
        c.logprobs += ev.new_logprobs
        c.experts += ev.new_experts
        if ev.finished:
            c.finish_reason = ev.finish_reason or "cancelled"
            text = ev.text if ev.text is not None else self.tok.decode(c.ids, skip_special_tokens=True)
        else:
            text = self.tok.decode(c.ids, skip_special_tokens=True).rstrip("\ufffd")
            hold = max((len(s) for s in c.stops), default=1) - 1
            text = text[:len(text) - hold] if hold else text
        if not text.startswith(c.sent) or len(text) <= len(c.sent):
            return ""
        delta, c.sent = text[len(c.sent):], text
        return delta

    def token_str(self, t: int) -> str:
        return self.tok.decode([t])

    def legacy_logprobs(self, entries: list[Logprob | None], tokens: list[int], offset: int) -> dict:
        """The completions API's logprobs: parallel lists; the prompt's first token has None."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp in zip(tokens, entries):
            s = self.token_str(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {self.token_str(k): v for k, v in lp.top.items()})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, entries: list[Logprob]) -> dict:
        def item(t, v):
            s = self.token_str(t)
            return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
        return {"content": [dict(item(lp.token, lp.logprob), top_logprobs=[item(k, v) for k, v in lp.top.items()])
                            for lp in entries]}

    def usage(self, choices: list[Choice]) -> dict:
        p, g = sum(len(c.prompt_ids) for c in choices), sum(len(c.ids) for c in choices)
        return {"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g}

    def prompt_echo(self, c: Choice, ev: RequestOutput, logprobs: int | None) -> tuple[str, dict | None]:
        """Echo: the prompt's text, and with logprobs the prompt tokens' logprobs (once, before the completion)."""
        c.echoed = True
        lp = None
        if logprobs is not None:
            entries = list(ev.prompt_logprobs)
            entries = (entries + [None] * len(c.prompt_ids))[:len(c.prompt_ids)]
            lp = self.legacy_logprobs(entries, c.prompt_ids, 0)
        return c.prompt_text, lp


def build_app(backend: Backend, served_model_name: str = "readmoe", api_key: str | None = None,
              start_engine: bool = True) -> FastAPI:
    """The FastAPI app. The lifespan starts the backend (the engine thread) and, at shutdown, stops it."""
    from contextlib import asynccontextmanager

    srv = Server(backend, served_model_name, api_key)

    @asynccontextmanager
    async def lifespan(app):
        if start_engine and not backend.alive:
            backend.start()
        yield
        srv.draining = True
        backend.stop(timeout=10)

    app = FastAPI(title="readmoe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible server for a pre-gated Read-ME Mixture-of-Experts.")
    app.state.server = srv

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        return error_response(400, f"{where}: {msg}" if where else msg, where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # a bug of ours, never a user's mistake
        return error_response(500, f"internal error: {type(exc).__name__}")

    async def authorized(request: Request) -> None:
        if srv.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if auth != f"Bearer {srv.api_key}":
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    guard = [Depends(authorized)]

    @app.get("/health", responses={503: DOCUMENTED[503]})
    async def health():
        if srv.draining or not backend.alive:
            return error_response(503, "draining" if srv.draining else "the engine is not running")
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        backend.refresh_metrics(srv.metrics)
        return PlainTextResponse(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=guard, responses={401: DOCUMENTED[401]})
    async def models():
        return {"object": "list", "data": [{"id": srv.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "readmoe", "max_model_len": srv.max_len}]}

    @app.post("/v1/completions", dependencies=guard, responses=DOCUMENTED)
    async def completions(body: CompletionRequest, request: Request):
        srv.check_model(body.model)
        p = body.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts:
            raise APIError(400, "prompt is empty", "prompt")
        encoded = []
        for x in prompts:
            ids = srv.encode(x) if isinstance(x, str) else srv.check_ids(list(x), "prompt")
            text = x if isinstance(x, str) else (srv.tok.decode(ids) if body.echo else "")
            encoded.append((ids, text))
        k = body.logprobs
        params = srv.sampling(body, body.max_tokens, k, k if body.echo and k is not None else None)
        choices, q = srv.submit(encoded, params, stream=bool(body.stream))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk_choice(c: Choice, ev: RequestOutput, delta: str, offset_before: int) -> dict:
            text, lp = delta, None
            if k is not None:
                lp = srv.legacy_logprobs(ev.new_logprobs, ev.new_ids, offset_before)
            if body.echo and not c.echoed:
                etext, elp = srv.prompt_echo(c, ev, k)
                text = etext + text
                if lp is not None:
                    lp = {key: elp[key] + [o + len(etext) for o in lp[key]] if key == "text_offset" else elp[key] + lp[key]
                          for key in lp}
            ch = {"index": c.index, "text": text, "logprobs": lp, "finish_reason": c.finish_reason}
            if body.return_experts:
                ch["experts"] = ev.new_experts
                if ev.replica is not None:
                    ch["replica"] = ev.replica
            return ch

        if body.stream:
            async def events():
                done, sent_len = 0, {c.index: 0 for c in choices}
                try:
                    while done < len(choices):
                        i, ev = await q.get()
                        c = choices[i]
                        if ev.error:
                            c.finish_reason = "error"
                            yield sse(error_body(ev.error_code, ev.error))
                            break
                        before = sent_len[i]
                        delta = srv.advance(c, ev)
                        sent_len[i] = len(c.sent)
                        done += ev.finished
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                                   "choices": [chunk_choice(c, ev, delta, before)]})
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse({"id": rid, "object": "text_completion", "created": created, "model": srv.name,
                                   "choices": [], "usage": srv.usage(choices)})
                    yield "data: [DONE]\n\n"
                finally:
                    srv.cancel(choices)
            return StreamingResponse(events(), media_type="text/event-stream")

        merged = await collect(srv, choices, q, request)
        out = []
        for c in choices:
            ev = merged[c.index]
            ch = chunk_choice(c, ev, c.sent, 0)
            out.append(ch)
        return {"id": rid, "object": "text_completion", "created": created, "model": srv.name, "choices": out,
                "usage": srv.usage(choices)}

    @app.post("/v1/chat/completions", dependencies=guard, responses=DOCUMENTED)
    async def chat(body: ChatCompletionRequest, request: Request):
        srv.check_model(body.model)
        ids = chat_ids(srv, body.messages)
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = srv.sampling(body, body.max_completion_tokens or body.max_tokens, k, None)
        choices, q = srv.submit([(ids, "")], params, stream=bool(body.stream))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        c = choices[0]

        def extras(ch: dict, ev: RequestOutput) -> dict:
            if k is not None:
                ch["logprobs"] = srv.chat_logprobs(ev.new_logprobs)
            if body.return_experts:
                ch["experts"] = ev.new_experts
                if ev.replica is not None:
                    ch["replica"] = ev.replica
            return ch

        if body.stream:
            async def events():
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.name}
                try:
                    yield sse(dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]))
                    while c.finish_reason is None:
                        _, ev = await q.get()
                        if ev.error:
                            c.finish_reason = "error"
                            yield sse(error_body(ev.error_code, ev.error))
                            break
                        delta = srv.advance(c, ev)
                        ch = {"index": 0, "delta": {"content": delta} if delta else {}, "logprobs": None,
                              "finish_reason": c.finish_reason}
                        yield sse(dict(head, choices=[extras(ch, ev)]))
                    if body.stream_options and body.stream_options.include_usage:
                        yield sse(dict(head, choices=[], usage=srv.usage(choices)))
                    yield "data: [DONE]\n\n"
                finally:
                    srv.cancel(choices)
            return StreamingResponse(events(), media_type="text/event-stream")

        ev = (await collect(srv, choices, q, request))[0]
        ch = {"index": 0, "message": {"role": "assistant", "content": c.sent}, "logprobs": None,
              "finish_reason": c.finish_reason}
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.name,
                "choices": [extras(ch, ev)], "usage": srv.usage(choices)}

    @app.post("/tokenize", dependencies=guard, responses=DOCUMENTED)
    async def tokenize(body: TokenizeRequest):
        srv.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        ids = (srv.encode(body.prompt, body.add_special_tokens) if body.prompt is not None
               else chat_ids(srv, body.messages))
        return {"count": len(ids), "max_model_len": srv.max_len, "tokens": ids}

    @app.post("/detokenize", dependencies=guard, responses=DOCUMENTED)
    async def detokenize(body: DetokenizeRequest):
        srv.check_model(body.model)
        return {"prompt": srv.tok.decode(srv.check_ids(body.tokens, "tokens"))}

    @app.get("/tokenizer_info", dependencies=guard)
    async def tokenizer_info():
        t = srv.tok
        return {"tokenizer_class": type(t).__name__, "eos_token": t.eos_token, "eos_token_id": t.eos_token_id,
                "bos_token": t.bos_token, "pad_token": t.pad_token, "chat_template": t.chat_template,
                "model_max_length": srv.max_len, "vocab_size": backend.vocab_size}

    return app


def chat_ids(srv: Server, messages) -> list[int]:
    tok = srv.tok
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                       add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template that rejects the conversation (e.g. role order)
        raise APIError(400, f"the chat template rejected these messages: {e}", "messages") from None
    return srv.encode(text, add_special_tokens=False, param="messages")


async def collect(srv: Server, choices: list[Choice], q: asyncio.Queue, request: Request) -> dict[int, RequestOutput]:
    """Wait for every choice to finish; cancel all if the client disconnects. Returns each choice's merged event
    (all its tokens and logprobs) for the response builder."""
    merged = {c.index: RequestOutput(None) for c in choices}
    while any(c.finish_reason is None for c in choices):
        try:
            i, ev = await asyncio.wait_for(q.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                srv.cancel(choices)
                raise APIError(499, "the client closed the connection") from None
            continue
        if ev.error:
            srv.cancel(choices)
            raise APIError(503, ev.error)
        srv.advance(choices[i], ev)
        merged[i].merge(ev)
    return merged
