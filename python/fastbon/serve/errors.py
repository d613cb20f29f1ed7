"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure the server answers,
so a client's own error handling (the ``openai`` package raises ``BadRequestError`` etc. from the status and reads
``param``) works unchanged."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

# Status -> OpenAI's error type (what api.openai.com returns for each).
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A refusal with its HTTP status, the request field it concerns (``param``) and a machine-readable ``code``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def bad_field(param: str, message: str, code: str = "invalid_value") -> APIError:
    """400 for one request field; the message starts with the field's name so a log line alone says what to fix."""
    return APIError(400, f"{param}: {message}", param=param, code=code)


def error_response(status: int, message: str, param=None, code=None, headers=None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _param(location: tuple) -> str | None:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"``; union members' type tags (pydantic
    adds ``"str"``, ``"list[int]"``) and the JSON decoder's character offset are not fields and are dropped."""
    parts = [part for part in location[1:] if not (isinstance(part, str) and ("[" in part or part in _TAGS))]
    if not parts or not isinstance(parts[0], str):
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before", "literal"}


def _validation_message(error: dict, param: str | None) -> str:
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
    if error["type"] == "extra_forbidden":
        return f"{param}: unknown field; this server refuses fields it cannot honour rather than ignoring them"
    if error["type"] == "model_attributes_type" and param is None:
        return "the body must be a JSON object (sent as Content-Type: application/json)"
    if error["type"] == "missing":
        return f"{param}: required"
    message = error["msg"].removeprefix("Value error, ")
    return f"{param}: {message}" if param else f"the body: {message}"


def install(app: FastAPI) -> None:
    """Every error path of ``app`` answers in OpenAI's shape; schema errors are 400 (OpenAI's), not FastAPI's 422."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        param = _param(tuple(first.get("loc", ())))
        return error_response(400, _validation_message(first, param), param, first["type"])

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception):
        return error_response(500, f"internal error: {type(error).__name__}: {error}", code="internal_error")
