"""OpenAI's chat-completions wire format for `cas_jax.serving.server`: the accepted request
body, the fields refused by name, and the response and stream-chunk bodies.

Implemented: model, messages, max_tokens / max_completion_tokens, temperature, top_p, n (1),
stop, frequency_penalty, presence_penalty, seed, logprobs, top_logprobs (0..20), stream,
stream_options.include_usage, user (an end user's id; it changes nothing, as at OpenAI), plus
this server's `cartridges` and `escape_special_tokens`. tools / tool_choice / functions are
accepted only empty or "none", response_format only {"type": "text"}; every other field is
refused with a 400 that names it. Strings holding a lone UTF-16 surrogate (not Unicode text)
are refused with a 400 that names where.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cas_jax.serving.engine import MAX_TOP_LOGPROBS, Completion, Delta, Sampling, ServeError
from cas_jax.serving.text import logprobs_content


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Part(_Strict):
    type: str
    text: str | None = None


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    tool_call_id: str | None = None

    def text(self, i: int) -> str | None:
        if not isinstance(self.content, list):
            return self.content
        for p in self.content:
            if p.type != "text" or p.text is None:
                raise ServeError(400, f"messages[{i}].content: part type {p.type!r} is not "
                                 f"supported (text parts only)", param="messages")
        return "".join(p.text for p in self.content)


class _CartridgeRef(_Strict):
    id: str


class _StreamOptions(_Strict):
    include_usage: bool = False


class _ResponseFormat(BaseModel):
    type: str


class ChatCompletionRequest(BaseModel):
    """The body of POST /v1/chat/completions (module doc); `refusals()` lists what is not
    served."""

    model_config = ConfigDict(extra="allow")

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
    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool | None = False
    stream_options: _StreamOptions | None = None
    user: str | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: _ResponseFormat | None = None
    cartridges: list[_CartridgeRef] = []
    escape_special_tokens: bool | None = None

    def check(self) -> None:
        """ServeError 400 for a field this server does not serve (module doc)."""
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise ServeError(400, f"{name}: this server offers no tool or function calling",
                             param=name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ServeError(400, f"{name}: this server offers no tool or function calling",
                                 param=name)
        if self.response_format is not None and self.response_format.type != "text":
            raise ServeError(400, f"response_format {self.response_format.type!r}: structured "
                             f"output is not supported (only {{'type': 'text'}})",
                             param="response_format")
        for name in sorted(self.model_extra or {}):
            raise ServeError(400, f"{name}: this field is not supported by this server",
                             param=name)
        if self.n not in (None, 1):
            raise ServeError(400, f"n={self.n}: this server returns one choice per request "
                             f"(n=1)", param="n")
        if self.top_logprobs and not self.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        for i, m in enumerate(self.messages):
            if m.tool_call_id is not None:
                raise ServeError(400, f"messages[{i}].tool_call_id: this server offers no "
                                 f"tools", param="messages")

    def sampling(self, default_max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 4 or not all(stop):
            raise ServeError(400, "stop: up to 4 non-empty strings", param="stop")
        return Sampling(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=tuple(stop),
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0, seed=self.seed,
            logprobs=bool(self.logprobs), top_logprobs=self.top_logprobs or 0)

    def chat(self) -> list[dict]:
        """The messages as {role, content (str or None)}."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


def check_text(value: Any, where: str = "body") -> None:
    """ServeError 400 if a string anywhere in `value` (parsed JSON) is not Unicode text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ServeError(400, f"{where} holds a lone surrogate "
                             f"({value[e.start]!r} at character {e.start}), which is not "
                             f"Unicode text", param=where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k, where)
            check_text(v, f"{where}.{k}" if where != "body" else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_text(v, f"{where}[{i}]")


def usage(c: Completion) -> dict:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
            "cartridge_tokens": c.cartridge_tokens}


class Responses:
    """Response bodies of one request: `head` has its id, created time, model and
    system_fingerprint."""

    def __init__(self, tokenizer, head: dict):
        self.tokenizer, self.head = tokenizer, head

    def _logprobs(self, entries) -> dict | None:
        if entries is None:
            return None
        return {"content": logprobs_content(self.tokenizer, list(entries)), "refusal": None}

    def completion(self, c: Completion) -> dict:
        return {**self.head, "object": "chat.completion", "usage": usage(c),
                "choices": [{"index": 0, "finish_reason": c.finish_reason,
                             "logprobs": self._logprobs(c.logprobs),
                             "message": {"role": "assistant", "content": c.text}}]}

    def chunk(self, delta: dict, finish: str | None = None, logprobs=None) -> dict:
        return {**self.head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": self._logprobs(logprobs),
                             "finish_reason": finish}]}

    def delta(self, d: Delta, with_logprobs: bool) -> dict:
        return self.chunk({"content": d.text}, logprobs=d.logprobs if with_logprobs else None)

    def usage_chunk(self, c: Completion) -> dict:
        return {**self.head, "object": "chat.completion.chunk", "choices": [], "usage": usage(c)}
