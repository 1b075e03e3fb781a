"""`ellm serve`: an OpenAI-compatible HTTP server on FastAPI, uvicorn and sse-starlette (the extra
`ellm[server]`). Requests from many clients run together on the continuous-batching engine."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from pydantic import BaseModel, ConfigDict, ValidationError
    from sse_starlette.sse import EventSourceResponse
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"ellm's server needs FastAPI, uvicorn and sse-starlette: pip install 'ellm[server]' ({exc})") \
        from None

from .engine import ContextLengthError, EngineClosedError, Event, QueueFullError
from .openai import OpenAIServing
from .params import InvalidRequestError

# How often a waiting non-streaming request looks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.1


class _Request(BaseModel):
    """Fields both endpoints share; others are passed on and refused by name if unsupported."""
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class ChatCompletionRequest(_Request):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _error_for(exc: BaseException) -> JSONResponse:
    if isinstance(exc, InvalidRequestError):
        return error_response(400, str(exc), param=exc.param, code=exc.code)
    if isinstance(exc, ContextLengthError):
        return error_response(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, QueueFullError):
        return error_response(503, f"the server is busy: {exc}", "server_busy", code="queue_full")
    if isinstance(exc, EngineClosedError):
        return error_response(503, str(exc), "server_error", code="engine_stopped")
    if isinstance(exc, ValueError):
        return error_response(400, str(exc))
    return error_response(500, f"{type(exc).__name__}: {exc}", "server_error")


class _State:
    def __init__(self) -> None:
        self.serving: OpenAIServing | None = None
        self.load_error: BaseException | None = None
        self.started = time.time()


def create_app(load: Callable[[], OpenAIServing] | OpenAIServing, *, api_key: str | None = None) -> FastAPI:
    """The app; `load` builds the engine (run on a thread at start-up, /health says 503 until done),
    or is the engine already built."""
    state = _State()
    app = FastAPI(title="ellm", version="0.1.0")
    app.state.ellm = state

    def loader() -> None:
        try:
            state.serving = load()
        except BaseException as exc:  # reported by /health and every request
            state.load_error = exc

    if isinstance(load, OpenAIServing):
        state.serving = load
    else:
        threading.Thread(target=loader, name="ellm-load", daemon=True).start()

    def unavailable() -> JSONResponse | None:
        if state.load_error is not None:
            return error_response(503, f"the model failed to load: {state.load_error}", "server_error")
        if state.serving is None:
            return error_response(503, "the model is still loading", "server_error", code="loading")
        if not state.serving.engine.alive:
            return error_response(503, f"the engine stopped{state.serving.engine._reason()}", "server_error",
                                  code="engine_stopped")
        return None

    def model_problem() -> str | None:
        """A model on other processes (a Ray pipeline's stages) may have lost one."""
        check = getattr(state.serving.engine.model, "check_health", None)
        return check() if check is not None else None

    # Checked in each /v1/ handler: an HTTP middleware (BaseHTTPMiddleware) would wrap `receive`, and
    # then no handler could see a client disconnect (request.is_disconnected() stays False).
    def refused(request: Request) -> JSONResponse | None:
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            return error_response(401, "Incorrect API key provided.", code="invalid_api_key")
        return unavailable()

    @app.get("/health")
    async def health():
        problem = unavailable()
        if problem is None:
            broken = await asyncio.to_thread(model_problem)
            if broken is not None:
                problem = error_response(503, f"the model cannot run: {broken}", "server_error", code="model_failed")
        return problem or {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        problem = refused(request)
        if problem:
            return problem
        return {"object": "list", "data": [{"id": state.serving.model_name, "object": "model",
                                           "created": int(state.started), "owned_by": "ellm"}]}

    @app.get("/metrics")
    async def metrics():
        lines = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP ellm_{name} {help_text}", f"# TYPE ellm_{name} {kind}", f"ellm_{name} {value}"])

        metric("up", "gauge", "1 once the model is loaded and the engine runs.", int(unavailable() is None))
        if state.serving is not None:
            s = state.serving.engine.stats()
            metric("requests_running", "gauge", "Requests holding a slot.", s["requests_running"])
            metric("requests_queued", "gauge", "Requests waiting for a slot.", s["requests_waiting"])
            metric("slots_in_use", "gauge", "KV slots held by requests.", s["slots_in_use"])
            metric("slots_total", "gauge", "KV slots.", s["slots_total"])
            metric("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.",
                   s["tokens_per_second"])
            metric("prompt_tokens_total", "counter", "Prompt tokens computed (reused prefixes not counted).",
                   s["prompt_tokens_total"])
            metric("generation_tokens_total", "counter", "Tokens generated.", s["generated_tokens_total"])
            metric("requests_total", "counter", "Requests accepted.", s["requests_total"])
            metric("engine_steps_total", "counter", "Engine steps run.", s["steps_total"])
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def complete(request: Request, schema: type[BaseModel], chat: bool):
        problem = refused(request)
        if problem:
            return problem
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error_response(415, "the request body must be JSON (Content-Type: application/json)")
        try:
            raw = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON")
        try:
            parsed = schema.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return error_response(400, f"{where}: {first['msg']}", param=str(first["loc"][0]) if first["loc"] else None)
        body = {**parsed.model_dump(exclude_unset=True, exclude_none=True), **(parsed.model_extra or {})}
        try:
            call = state.serving.call(body, chat)
        except Exception as exc:
            return _error_for(exc)

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        try:
            handle = call.submit(lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        except Exception as exc:
            return _error_for(exc)

        if call.stream:
            async def chunks():
                try:
                    while True:
                        event = await events.get()
                        if event.error is not None:
                            yield json.dumps({"error": {"message": str(event.error), "type": "server_error"}})
                            return
                        for chunk in call.chunks(event):
                            yield json.dumps(chunk)
                        if event.finish_reason is not None:
                            yield "[DONE]"
                            return
                finally:
                    handle.cancel()  # a client gone mid-stream frees its slot at the next step

            return EventSourceResponse(chunks(), ping=15)

        try:
            checked = time.monotonic()
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_SECONDS)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:  # tokens may arrive faster than that
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return None
                if event is None:
                    continue
                if event.error is not None:
                    return _error_for(event.error)
                call.take(event)
                if event.finish_reason is not None:
                    return call.response()
        finally:
            handle.cancel()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, ChatCompletionRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, CompletionRequest, chat=False)

    return app


def serving_loader(model_path: str | None, *, slots: int = 4, max_seq_len: int = 2048, dtype: str = "auto",
                   max_queue: int = 64, ray_plan: Any = None, ray_address: str | None = None,
                   fingerprint: str | None = None, threads: int | None = None) -> Callable[[], OpenAIServing]:
    """What `create_app` runs to load the model (the bundled one when None): in this process, or
    with `ray_plan` split into pipeline stages on Ray (`ellm.distributed.PipelineModel`).
    `threads`: the engine's threads here, or each stage's (default: every core)."""

    def load() -> OpenAIServing:
        from .._bundled import bundled_model_path
        from ..generation import Llama

        path = model_path or bundled_model_path()
        model = None
        if ray_plan is not None:
            from ..distributed import PipelineModel

            model = PipelineModel.from_pretrained(path, ray_plan, dtype=dtype, max_seq_len=max_seq_len,
                                                  max_batch_size=slots, threads_per_stage=threads,
                                                  address=ray_address)
        elif threads is not None:
            os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the engine's pool starts
        llm = Llama(path, max_seq_len=max_seq_len, max_batch_size=slots, dtype=dtype, model=model)
        serving = llm.serving(max_queue=max_queue)
        if fingerprint is not None:
            serving.fingerprint = fingerprint
        return serving

    return load


def serve(model_path: str | None, *, host: str = "127.0.0.1", port: int = 8000, slots: int = 4,
          max_seq_len: int = 2048, dtype: str = "auto", api_key: str | None = None, max_queue: int = 64,
          log_level: str = "info", ray_plan: Any = None, ray_address: str | None = None,
          threads: int | None = None) -> None:
    """Load the model (the bundled one when None; split over Ray nodes by `ray_plan`) and serve it
    until interrupted."""
    import uvicorn

    load = serving_loader(model_path, slots=slots, max_seq_len=max_seq_len, dtype=dtype, max_queue=max_queue,
                          ray_plan=ray_plan, ray_address=ray_address, threads=threads)
    uvicorn.run(create_app(load, api_key=api_key), host=host, port=port, log_level=log_level)
