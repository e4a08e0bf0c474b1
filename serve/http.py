"""`omni-jax serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

FastAPI on uvicorn: the stack vLLM and SGLang serve the same API with, so its behaviour (server-sent events,
graceful shutdown, request disconnects) is the one OpenAI clients are tested against, and neither the HTTP parsing
nor the SSE framing is ours to maintain.

Endpoints:
  POST /v1/chat/completions   (request fields: serve.openai_format)
  GET  /v1/models
  GET  /health                {"status": "ok", "active": slots in use, "waiting": queued requests}

The engine runs in its own thread (`ContinuousEngine.start`); every request gets an asyncio queue that the engine's
events are forwarded to. A request's media are processed in a worker thread before it is queued, so that a bad
request gets its 400 at once. Errors: 400 with the OpenAI error body naming the field (`param`) for a bad request
(unknown voice, unreadable media, a prompt over the context, a bad parameter); 500 for a request whose generation
fails (the others go on). A client that disconnects mid-stream cancels its request, freeing its slot. On shutdown
(SIGINT / SIGTERM) uvicorn stops accepting connections and waits for the requests in flight; the engine then stops.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import shutil
import tempfile
import time
import uuid
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from serve.continuous import ContinuousEngine
from serve.events import AudioChunk, Failed, Finished, TextDelta
from serve.openai_format import (BadRequest, chunk, completion, error_body, param_of, pcm16_bytes, to_engine_request,
                                 to_openai_message, usage)
from serve.requests import RequestError

log = logging.getLogger(__name__)


def create_app(engine: ContinuousEngine, model_name: str):
    """The FastAPI app serving `engine` under the model id `model_name`."""
    listeners: dict[str, asyncio.Queue] = {}
    state: dict[str, Any] = {}

    def on_event(event) -> None:  # engine thread -> the request's queue on the event loop
        q = listeners.get(event.id)
        if q is not None:
            state["loop"].call_soon_threadsafe(q.put_nowait, event)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["loop"] = asyncio.get_running_loop()
        engine.start(on_event)
        yield
        await run_in_threadpool(engine.stop, True)

    app = FastAPI(title="omni-jax", lifespan=lifespan)

    def bad(message: str, param: Optional[str] = None, status: int = 400):
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse(error_body(to_openai_message(message), kind, param), status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": engine.num_active, "waiting": len(engine._waiting)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "omni-jax", "max_model_len": engine.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(http_request: Request):
        try:
            body = await http_request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return bad(f"the request body is not valid JSON: {err}")
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        folder = tempfile.mkdtemp(prefix="omni-jax-request-")
        cleanup = True
        try:
            try:
                raw, options = to_engine_request(body, request_id, folder, engine.speakers)
                request = engine.parse(raw)
                prepared = await run_in_threadpool(engine.prepare, request)
            except BadRequest as err:
                return bad(str(err), err.param)
            except (RequestError, ValueError, OSError) as err:
                message = str(err).replace(f"request {request_id!r}: ", "")
                return bad(message, param_of(message))
            events: asyncio.Queue = asyncio.Queue()
            listeners[request_id] = events
            ticket = engine.submit(request, prepared=prepared)
            prompt_tokens = prepared.prompt_len
            if options["stream"]:
                cleanup = False
                return StreamingResponse(_stream(events, ticket, request_id, prompt_tokens, options, folder),
                                         media_type="text/event-stream")
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, Finished):
                        return completion(request_id, model_name, event.text, event.finish_reason, prompt_tokens,
                                          len(event.token_ids), event.audio, options["audio_format"])
                    if isinstance(event, Failed):
                        status = 400 if event.kind == "invalid" else 500
                        return bad(event.error, param_of(event.error) if status == 400 else None, status)
            except asyncio.CancelledError:  # the client went away
                engine.cancel(ticket)
                raise
            finally:
                listeners.pop(request_id, None)
        finally:
            if cleanup:
                shutil.rmtree(folder, ignore_errors=True)

    async def _stream(events: asyncio.Queue, ticket: int, request_id: str, prompt_tokens: int, options: dict,
                      folder: str):
        created = int(time.time())
        done = False

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            yield sse(chunk(request_id, model_name, {"role": "assistant", "content": ""}, created=created))
            while True:
                event = await events.get()
                if isinstance(event, TextDelta):
                    delta: dict = {"content": event.text}
                    if options["audio_format"]:
                        delta["audio"] = {"id": f"audio-{request_id}", "transcript": event.text}
                    yield sse(chunk(request_id, model_name, delta, created=created))
                elif isinstance(event, AudioChunk):
                    data = base64.b64encode(pcm16_bytes(event.audio)).decode()  # streamed audio is pcm16 24 kHz
                    yield sse(chunk(request_id, model_name, {"audio": {"id": f"audio-{request_id}", "data": data}},
                                    created=created))
                elif isinstance(event, Finished):
                    done = True
                    yield sse(chunk(request_id, model_name, {}, event.finish_reason, created=created))
                    if options["include_usage"]:
                        final = chunk(request_id, model_name, {}, created=created,
                                      usage_=usage(prompt_tokens, len(event.token_ids)))
                        final["choices"] = []
                        yield sse(final)
                    yield "data: [DONE]\n\n"
                    return
                elif isinstance(event, Failed):
                    done = True
                    kind = "invalid_request_error" if event.kind == "invalid" else "server_error"
                    yield sse(error_body(to_openai_message(event.error), kind))
                    yield "data: [DONE]\n\n"
                    return
        finally:
            listeners.pop(request_id, None)
            if not done:  # the client disconnected (or the server is going down mid-stream)
                engine.cancel(ticket)
            shutil.rmtree(folder, ignore_errors=True)

    return app


def serve(engine: ContinuousEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout: Optional[float] = None) -> None:
    """Run the server until SIGINT / SIGTERM (then finish the requests in flight)."""
    import uvicorn

    config = uvicorn.Config(create_app(engine, model_name), host=host, port=port, log_level="info",
                            timeout_graceful_shutdown=graceful_timeout)
    uvicorn.Server(config).run()
