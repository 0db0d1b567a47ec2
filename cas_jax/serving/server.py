"""An OpenAI-compatible HTTP server for a model reading cartridges.

  app = make_app(model, store, ServeConfig(budget_bytes=...))   # a FastAPI app
  serve(model, store, config, host="127.0.0.1", port=8000)        # runs it under uvicorn
  with ServerThread(app) as s: ... s.url ...                      # in-process, for tests

FastAPI + uvicorn: a standard ASGI stack, pydantic validation of request bodies, server-sent
events through `StreamingResponse`.

Endpoints:
  POST /v1/chat/completions  OpenAI's chat completions (fields: `serving_api`), plus
      `cartridges: [{"id": doc id}, ...]` (the openai client: `extra_body=`), composed in order
      as the attention prefix under `ServeConfig.geometry`, and `escape_special_tokens`.
      usage: prompt_tokens, completion_tokens, total_tokens (prompt + completion) and
      cartridge_tokens (the visible prefix tokens, counted apart).
  GET /v1/models, GET /v1/cartridges (id, tokens, bytes, resident), GET /health (the
      composition geometry, how routed requests are scored, and the engine's counters: steps,
      pool shape, compiles, paging).

A request's path: the body is refused with 413 past `max_body_bytes` before it is parsed (by
Content-Length, or while it is read); the messages are rendered to prompt tokens on the
tokenizer threads (`serving_prompt`: bounded, never on the engine thread); the engine
(`serving_continuous`, or `serving_static`) queues it. The response starts once the request
holds a row, so a request refused at admission still gets its HTTP status. A stream then sends
the role chunk, one chunk per decode step that made text final (`serving_text`: whole UTF-8
characters, stop strings never split), the finish chunk, the usage chunk if asked for, and
`data: [DONE]`. A client that disconnects (streaming or not) cancels its request: its row is
freed at the next step.

Rendering is the project's one (`cas_jax.model.rendering`): a leading system (or developer) message
is the document block between the cartridges and the conversation, which is exactly in-context
learning of that text (the benchmark's ICL path).

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 404 unknown cartridge
or model, 422 corrupt or unreadable cartridge or one made for another model, 413 body too
large, 400 malformed body, a field this server does not serve, too many or repeated
cartridges, over the window or the budget. Messages never carry a server path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cas_jax.cartridges.store import CartridgeStore
from cas_jax.model.loading import LoadedModel
from cas_jax.serving.api import ChatCompletionRequest, Responses, check_text
from cas_jax.serving.continuous import ContinuousEngine
from cas_jax.serving.engine import Handle, ServeConfig, ServeError
from cas_jax.serving.prompt import PromptMaker, last_user_text
from cas_jax.serving.static import StaticEngine

__all__ = ["make_app", "serve", "ServerThread", "ServeConfig", "ContinuousEngine",
           "StaticEngine"]

_log = logging.getLogger(__name__)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _public(e: BaseException) -> ServeError:
    """`e` as the error a client sees: a ServeError as it is, anything else as a 500 that
    names only its type (the traceback goes to the log)."""
    if isinstance(e, ServeError):
        return e
    _log.error("request failed", exc_info=e)
    return ServeError(500, f"internal server error ({type(e).__name__})", type="server_error")


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, before the app reads it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def _refuse(self, send) -> None:
        body = json.dumps(ServeError(413, f"the request body is over {self.limit} bytes "
                                     f"(--max_body_bytes)", code="request_too_large").body())
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _cancel_on_disconnect(request: Request, handle: Handle) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


def _install_error_handlers(app: FastAPI) -> None:
    """OpenAI's error body for every error (module doc)."""

    @app.exception_handler(ServeError)
    async def _serve_error(_, e: ServeError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(ServeError(400, f"{loc or 'body'}: {first.get('msg')}",
                                       param=loc or None).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http(_, e: HTTPException):
        return JSONResponse(ServeError(e.status_code, str(e.detail),
                                       type="not_found_error" if e.status_code == 404
                                       else "invalid_request_error").body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        error = _public(e)
        return JSONResponse(error.body(), status_code=error.status)


class _Chat:
    """POST /v1/chat/completions (module doc)."""

    def __init__(self, model: LoadedModel, engine, config: ServeConfig, model_id: str):
        self.model, self.engine, self.config, self.model_id = model, engine, config, model_id
        self.prompts = PromptMaker(model.tokenizer, model.config.max_position_embeddings)
        self.tokenizer_pool = ThreadPoolExecutor(config.tokenizer_threads,
                                                 "cas-serving-tokenizer")
        self.fingerprint = f"cas_jax-{model.fingerprint[:16]}"

    def _prepare(self, req: ChatCompletionRequest, listener) -> Handle:
        """On a tokenizer thread: the prompt, then the engine's checks and queue."""
        escape = (self.config.escape_special_tokens if req.escape_special_tokens is None
                  else req.escape_special_tokens)
        messages = req.chat()
        prompt = self.prompts(messages, escape)
        return self.engine.submit(prompt, [c.id for c in req.cartridges],
                                  req.sampling(self.config.default_max_tokens), listener,
                                  query=last_user_text(messages))

    def _check(self, req: ChatCompletionRequest) -> None:
        check_text(req.model_dump(exclude_none=True))
        req.check()
        if req.model != self.model_id:
            raise ServeError(404, f"model {req.model!r} is not served here; it serves "
                             f"{self.model_id!r}", type="not_found_error", param="model",
                             code="model_not_found")
        req.sampling(self.config.default_max_tokens)  # its 400s before any tokenisation

    async def __call__(self, req: ChatCompletionRequest, request: Request):
        self._check(req)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(kind, payload):
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody listens
                loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        handle = await loop.run_in_executor(self.tokenizer_pool, self._prepare, req, listener)
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
        try:
            kind, payload = await events.get()  # "start", or the error that refused it
            if kind == "error":
                raise payload
            responses = Responses(self.model.tokenizer, {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_id, "system_fingerprint": self.fingerprint})
            if not req.stream:
                completion = await asyncio.wrap_future(handle.future)
                watcher.cancel()
                return responses.completion(completion)
        except BaseException:
            watcher.cancel()
            handle.cancel()
            raise
        return StreamingResponse(
            _stream(events, responses, handle, watcher, req), media_type="text/event-stream")


def make_app(model: LoadedModel, store: CartridgeStore, config: ServeConfig = ServeConfig()
             ) -> FastAPI:
    """The FastAPI app serving `model` with the cartridges of `store` (module doc). Its engine
    (`app.state.engine`) starts now and is closed when the app shuts down."""
    engine = (ContinuousEngine if config.engine == "continuous" else StaticEngine)(
        model, store, config)
    model_id = config.model_id or os.path.basename(model.path.rstrip("/")) or "cas_jax"
    chat = _Chat(model, engine, config, model_id)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await run_in_threadpool(engine.close)
        chat.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cas_jax", lifespan=lifespan)
    app.state.engine = engine
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    _install_error_handlers(app)

    @app.get("/health")
    def health():
        cat = engine.catalogue
        return {"status": "ok", "model": model_id, "geometry": str(cat.geometry),
                "routing": cat.routing, **engine.status()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "cas_jax"}]}

    @app.get("/v1/cartridges")
    def cartridges():
        return {"object": "list", "data": engine.catalogue.rows(),
                "budget_bytes": engine.budget.budget_bytes,
                "max_cartridges": config.max_cartridges,
                "max_cartridge_tokens": engine.max_cartridge_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await chat(req, request)

    return app


async def _stream(events: asyncio.Queue, responses: Responses, handle: Handle,
                  watcher: asyncio.Task, req: ChatCompletionRequest):
    """The SSE events of a started request (module doc)."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    try:
        yield _sse(responses.chunk({"role": "assistant", "content": ""}))
        while True:
            kind, payload = await events.get()
            if kind == "delta":
                yield _sse(responses.delta(payload, bool(req.logprobs)))
            elif kind == "done":
                yield _sse(responses.chunk({}, payload.finish_reason))
                if include_usage:
                    yield _sse(responses.usage_chunk(payload))
                yield "data: [DONE]\n\n"
                return
            elif kind == "error":
                yield _sse(_public(payload).body())
                return
    finally:
        watcher.cancel()
        if not handle.future.done():
            handle.cancel()


def serve(model: LoadedModel, store: CartridgeStore, config: ServeConfig = ServeConfig(),
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves `make_app(model, store, config)` on host:port until interrupted."""
    run_app(make_app(model, store, config), host, port, log_level)


def run_app(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
            log_level: str = "info") -> None:
    """Serves `app` (from `make_app`) on host:port until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level)


class ServerThread:
    """uvicorn serving `app` on a background thread at `url` (port 0 = a free port) until
    `stop()` (or the end of a `with` block), which also shuts the app down."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.url = f"http://{host}:{sock.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="cas-uvicorn", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the server thread exited before it started serving")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "ServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
