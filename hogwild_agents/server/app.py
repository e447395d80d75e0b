"""The OpenAI-compatible FastAPI app over one engine: /v1/chat/completions, /v1/models, /health.

`create_app(engine, config)` builds it around a given engine (loaded once, shared by every request;
concurrent requests share forwards on the engine's scheduler). Each request is one ChatHogwild call.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.errors import CacheCapacityError
from hogwild_agents.server.config import ServerConfig
from hogwild_agents.server.convert import Call, completion, prepare
from hogwild_agents.server.errors import APIError, bad_request
from hogwild_agents.server.schemas import parse_request
from hogwild_agents.server.streaming import (
    DONE,
    ChunkWriter,
    ClientGone,
    GuardedStream,
    disconnected,
    sse,
    unless_gone,
)
from langchain_hogwild import ChatHogwild

logger = logging.getLogger("hogwild_agents.server")
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (nobody reads it)


def create_app(engine: HogwildEngine, config: ServerConfig | None = None) -> FastAPI:
    """The server's ASGI app over `engine`, with `config`'s defaults and limits."""
    config = config or ServerConfig()
    model = ChatHogwild(
        engine=engine,
        n_workers=config.n_workers,
        protocol=config.protocol,
        layout=config.layout,
        max_tokens=config.max_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
    )
    started = int(time.time())
    app = FastAPI(title="hogwild serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config, app.state.model = engine, config, model

    def count_tokens(text: str) -> int:
        return len(engine.encode(text)) if text else 0

    def authorized(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            token.strip().encode(), config.api_key.encode()
        ):
            raise APIError(
                "Incorrect or missing API key: send the header `Authorization: Bearer <key>`.",
                status=401,
                code="invalid_api_key",
            )

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
        body = APIError(str(error.detail), status=error.status_code, code=str(error.status_code)).body()
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, error: Exception) -> JSONResponse:
        # the error is raised on after this response is sent, and the ASGI server logs it
        body = APIError(f"Internal server error: {error}", status=500, type="server_error").body()
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "busy": engine.busy}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict[str, Any]:
        entry = {
            "id": config.model_name,
            "object": "model",
            "created": started,
            "owned_by": "hogwild",
            "max_model_len": engine.max_positions,
        }
        return {"object": "list", "data": [entry]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request) -> Response:
        call = prepare(parse_request(await read_body(request, config.max_request_bytes)), config)
        if call.stream:
            return await stream_reply(request, model, call, ChunkWriter(call, count_tokens))
        try:
            message = await unless_gone(
                _client_errors(model.ainvoke(call.messages, **call.options)), disconnected(request.receive)
            )
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(completion(call, message, count_tokens))

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (400) past `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_large = bad_request(
        f"The request body is larger than this server's limit of {limit} bytes; send less "
        "(or start the server with a larger --max-request-bytes).",
        code="request_too_large",
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _client_errors(work: Any) -> Any:
    """Await a call; a run the request itself makes impossible (a prompt longer than the context,
    more cache than the engine may use, ...) is a 400."""
    try:
        return await work
    except (ValueError, CacheCapacityError) as error:
        raise bad_request(str(error)) from None


async def stream_reply(request: Request, model: ChatHogwild, call: Call, writer: ChunkWriter) -> Response:
    """A streaming response. The call's first chunk is awaited before the response starts, so that a
    request the run refuses gets an error status, not a broken stream."""
    stream = GuardedStream(model.astream(call.messages, **call.options), disconnected(request.receive))
    try:
        first = await _client_errors(anext(stream))
    except ClientGone:
        await stream.aclose()
        return Response(status_code=CLIENT_CLOSED)
    except StopAsyncIteration:
        first = None
    except BaseException:
        await stream.aclose()
        raise
    return StreamingResponse(
        _events(stream, writer, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(stream: GuardedStream, writer: ChunkWriter, first: Any) -> AsyncIterator[str]:
    try:
        yield sse(writer.opening())
        if first is not None:
            for chunk in writer.feed(first):
                yield sse(chunk)
        async for message in stream:
            for chunk in writer.feed(message):
                yield sse(chunk)
        yield DONE
    except ClientGone:
        return
    except Exception as error:  # the response has started: the error goes in the stream
        logger.exception("streaming failed")
        kind = (
            "invalid_request_error" if isinstance(error, ValueError | CacheCapacityError) else "server_error"
        )
        yield sse(APIError(str(error), type=kind).body())
        yield DONE
    finally:
        await _shielded(stream.aclose())


async def _shielded(work: Any) -> None:
    """Await `work` even while the surrounding task is being cancelled (the server's own cancel scope)."""
    with anyio.CancelScope(shield=True):
        await work
