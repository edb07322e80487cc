"""Every error meant for the user, in one hierarchy.

Each carries a message that says what is wrong and what to do; the CLI prints it
(no traceback unless --debug) and exits with its ``exit_code``: 1 when the work
failed, 2 for bad usage or input.  Serving errors also carry what an OpenAI-style
error response needs (HTTP status, ``code``, ``param``).
"""

from __future__ import annotations

from typing import Any


class VicunaError(Exception):
    """An error whose message is meant for the user."""

    exit_code = 1  # 1: the work failed; 2: bad usage or input


class UsageError(VicunaError):
    """Bad command-line usage or bad input data."""

    exit_code = 2


class OutputError(VicunaError):
    """An output cannot be written: disk full (exit code 1), read-only or forbidden place (exit code 2)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- areas


class DataError(UsageError):
    """A data file or path cannot be used as given: unreadable, malformed, would be overwritten (exit code 2)."""


class TrainError(VicunaError):
    """Training failed (the message says why and what to do)."""


class TrainInputError(UsageError):
    """Bad training input: data file, recipe or flags (exit code 2)."""


class WeightsError(VicunaError):
    """Work on weights failed (exit code 1)."""


class CheckpointError(WeightsError):
    """An input checkpoint is unusable: missing or truncated shard, shape mismatch, ... (exit code 2)."""

    exit_code = 2


class ModelLoadError(VicunaError):
    """The model cannot be loaded as asked; the message says why and what to do."""


class EvalUsageError(UsageError):
    """Bad evaluation input or options (exit code 2)."""


class RecipeError(VicunaError):
    """An end-to-end recipe step failed."""


# ----------------------------------------------------------------------------- serving

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable_error"}


class ServeError(VicunaError):
    """A request failed; carries what an OpenAI-style error response needs.

    ``status`` is the HTTP status to answer with, ``code``/``param`` follow
    OpenAI's error object, ``retry_after`` (seconds) becomes a Retry-After header.
    """

    status = 500
    code: str | None = None

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.param = param
        self.retry_after = retry_after

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def to_dict(self) -> dict[str, Any]:
        """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def from_dict(cls, body: Any, status: int, retry_after: float | None = None) -> "ServeError":
        """Rebuild an error sent by a worker (so the front end answers with the worker's status)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return ServeError(f"upstream answered {status}: {str(body)[:200]}", status=502 if status < 400 else status)
        sub = {404: ModelNotFound, 401: AuthError, 429: Overloaded, 503: Overloaded}.get(status, ServeError)
        if status == 400:
            sub = ContextLengthExceeded if err.get("code") == "context_length_exceeded" else InvalidRequest
        return sub(str(err.get("message", "")), status=status, code=err.get("code"), param=err.get("param"),
                   retry_after=retry_after)


class InvalidRequest(ServeError):
    status = 400


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class AuthError(ServeError):
    status = 401
    code = "invalid_api_key"


class ModelNotFound(ServeError):
    status = 404
    code = "model_not_found"

    @classmethod
    def for_model(cls, model: str, available: list[str]) -> "ModelNotFound":
        names = ", ".join(available) or "none"
        return cls(f"The model {model!r} does not exist or is not served here. Available: {names}.", param="model")


class Overloaded(ServeError):
    """Back-pressure: the queue is full (429) or no worker can take the request (503)."""

    status = 429
    code = "rate_limit_exceeded"


class Unavailable(ServeError):
    status = 503
    code = "model_unavailable"


def error_response(err: ServeError):
    """``err`` as an HTTP response (OpenAI's body, its status, Retry-After when it has one).

    One home for every server of the project (API front end, worker, controller); Starlette is imported
    here, not at the top, so the rest of this module stays free of HTTP for the CLI and library users.
    """
    from starlette.responses import JSONResponse

    headers = {"Retry-After": str(max(1, round(err.retry_after)))} if err.retry_after else None
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)
