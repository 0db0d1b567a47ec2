"""An OpenAI-compatible HTTP server for a model reading cartridges.

  app = make_app(model, store, ServeConfig(budget_bytes=...))   # a FastAPI app
  serve(model, store, config, host="127.0.0.1", port=8000)        # runs it under uvicorn
  with ServerThread(app) as s: ... s.url ...                      # in-process, for tests

FastAPI + uvicorn: a standard ASGI stack (any ASGI tooling works), pydantic validation of
request bodies against declared models, and server-sent events through `StreamingResponse`.

Endpoints:
  POST /v1/chat/completions  OpenAI's chat completions: model, messages, max_tokens (or
      max_completion_tokens), temperature (default 1.0, as OpenAI's), top_p, stop (strings),
      frequency_penalty, presence_penalty, n (1 only), stream (+ stream_options.include_usage),
      plus `cartridges: [{"id": doc id}, ...]` (the openai client: `extra_body=`), composed in
      order as the attention prefix. Unknown fields are ignored.
      usage: prompt_tokens, completion_tokens, total_tokens (prompt + completion) and
      cartridge_tokens (the visible prefix tokens, counted apart).
  GET /v1/models, GET /v1/cartridges (id, tokens, bytes, resident), GET /health.

Rendering is the project's one (`cas_jax.rendering`): the conversation without a system turn,
after the cartridges. A system message is folded, not refused: if it is the first message, its
text is rendered as the document block (`rendering.document`) between the cartridges and the
conversation, which is exactly in-context learning of that text (the benchmark's ICL path); a
system message anywhere else is a 400.

Streaming is not token by token: the engine generates a whole batch in one jitted call
(`serving_engine`), so a stream sends the role chunk at once, then the completion as one
chunk, the finish chunk, the usage chunk if asked for, and `data: [DONE]`.

Errors use OpenAI's body {"error": {"message", "type", "param", "code"}}: 404 unknown
cartridge or model, 422 corrupt cartridge or one made for another model, 400 malformed body,
too many cartridges, over the window or the budget, n != 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Literal

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cas_jax.loading import LoadedModel
from cas_jax.serving_engine import Completion, Engine, Sampling, ServeConfig, ServeError
from cas_jax.store import CartridgeStore

__all__ = ["make_app", "serve", "ServerThread", "ServeConfig", "Engine"]


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(
            p.text for p in self.content)


class _CartridgeRef(BaseModel):
    id: str


class _StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The accepted body of POST /v1/chat/completions (module doc)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    cartridges: list[_CartridgeRef] = []


def _sampling(req: ChatCompletionRequest, default_max_tokens: int) -> Sampling:
    if req.n not in (None, 1):
        raise ServeError(400, f"n={req.n}: this server returns one choice per request (n=1)",
                         param="n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or not all(stop):
        raise ServeError(400, "stop: up to 4 non-empty strings", param="stop")
    return Sampling(
        max_tokens=req.max_completion_tokens or req.max_tokens or default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=tuple(stop),
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0)


def _usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "cartridge_tokens": c.cartridge_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(model: LoadedModel, store: CartridgeStore, config: ServeConfig = ServeConfig()
             ) -> FastAPI:
    """The FastAPI app serving `model` with the cartridges of `store` (module doc). Its engine
    (`app.state.engine`) starts now and is closed when the app shuts down."""
    engine = Engine(model, store, config)
    model_id = config.model_id or os.path.basename(model.path.rstrip("/")) or "cas_jax"

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await run_in_threadpool(engine.close)

    app = FastAPI(title="cas_jax", lifespan=lifespan)
    app.state.engine = engine

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
        return JSONResponse(ServeError(500, f"{type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, **engine.status()}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                            "owned_by": "cas_jax"}]}

    @app.get("/v1/cartridges")
    def cartridges():
        return {"object": "list", "data": engine.catalogue(),
                "budget_bytes": engine.budget.budget_bytes,
                "max_cartridges": config.max_cartridges,
                "max_cartridge_tokens": engine.max_cartridge_tokens}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.model != model_id:
            raise ServeError(404, f"model {req.model!r} is not served here; it serves "
                             f"{model_id!r}", type="not_found_error", param="model",
                             code="model_not_found")
        params = _sampling(req, config.default_max_tokens)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        future = await run_in_threadpool(engine.submit, messages,
                                         [c.id for c in req.cartridges], params)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id}
        if not req.stream:
            c = await asyncio.wrap_future(future)
            return {**head, "object": "chat.completion", "usage": _usage(c),
                    "choices": [{"index": 0, "finish_reason": c.finish_reason, "logprobs": None,
                                 "message": {"role": "assistant", "content": c.text}}]}
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            chunk = {**head, "object": "chat.completion.chunk"}

            def choice(delta, finish=None):
                return _sse({**chunk, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}]})
            yield choice({"role": "assistant", "content": ""})
            try:
                c = await asyncio.wrap_future(future)
            except Exception as e:
                yield _sse(ServeError(500, f"{type(e).__name__}: {e}", type="server_error").body())
                return
            yield choice({"content": c.text})
            yield choice({}, c.finish_reason)
            if include_usage:
                yield _sse({**chunk, "choices": [], "usage": _usage(c)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(model: LoadedModel, store: CartridgeStore, config: ServeConfig = ServeConfig(),
          host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serves `make_app(model, store, config)` on host:port until interrupted."""
    uvicorn.run(make_app(model, store, config), host=host, port=port, log_level=log_level)


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
