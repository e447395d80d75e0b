"""Errors a request gets, in OpenAI's error format."""

from __future__ import annotations

from typing import Any

from hogwild_agents.errors import HogwildError


class APIError(HogwildError):
    """A request the server refuses: HTTP `status` with OpenAI's error body
    `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(message, param=param, code=code)
