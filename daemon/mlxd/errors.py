"""The small exception tree of mlxd, mapped to each API's error JSON in one place.

``MlxdError.body()`` is the OpenAI shape; ``MlxdError.anthropic()`` the Anthropic Messages
shape and status (``/v1/messages`` routes answer only in that shape). The app's error boundary
(:mod:`mlxd.api.app`) picks one by route.

MlxdError                      base; carries status, type, code, param
├── BadRequest                 400 invalid_request_error
│   ├── ContextLengthExceeded  400 context_length_exceeded
│   └── PreviousResponseNotFound 400 previous_response_not_found
├── Unauthorized               401 authentication_error
├── Forbidden                  403 permission_error
├── NotFound                   404 not_found_error
├── PayloadTooLarge            413 invalid_request_error
├── Overloaded                 429/503 with Retry-After
├── ModelUnavailable           503 (loading, failed to load, switching), Retry-After
├── GenerationFailed           500 server_error (a bug or an MLX failure mid-generation)
└── StorageFailed              500 storage_error (the conversation store cannot write)

ModelLoadError                 raised by model resolution/loading; never reaches HTTP
└── UnsupportedModelError      the file is readable but of a kind mlxd cannot serve
"""

from __future__ import annotations


class MlxdError(Exception):
    """An error with an HTTP status and OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body: ``{"error": {message, type, param, code}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic(self) -> tuple[int, dict[str, object]]:
        """Status and body in Anthropic's shape: ``{"type": "error", "error": {type,
        message}}``. A busy or loading server is 529 ``overloaded_error`` (the Anthropic SDK
        retries it); a full queue with a count limit is 429 ``rate_limit_error``."""
        status = self.status
        kinds = {
            400: "invalid_request_error",
            401: "authentication_error",
            403: "permission_error",
            404: "not_found_error",
            413: "request_too_large",
            429: "rate_limit_error",
            529: "overloaded_error",
        }
        if status == 503:
            status = 529
        elif 400 <= status < 500 and status not in kinds:
            status = 400  # 405, 415, ...: Anthropic has no type for them
        kind = kinds.get(status, "api_error")
        if kind == "api_error":
            status = 500
        return status, {"type": "error", "error": {"type": kind, "message": self.message}}


class BadRequest(MlxdError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class PreviousResponseNotFound(BadRequest):
    code = "previous_response_not_found"


class Unauthorized(MlxdError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(MlxdError):
    status = 403
    type = "permission_error"


class NotFound(MlxdError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(MlxdError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class NotSupported(MlxdError):
    """A valid request this server's setup cannot answer (e.g. embeddings from a model split
    across a process group)."""

    status = 501
    type = "invalid_request_error"
    code = "not_supported"


class Overloaded(MlxdError):
    status = 503
    type = "server_error"
    code = "overloaded"


class ModelUnavailable(MlxdError):
    status = 503
    type = "server_error"
    code = "model_unavailable"


class GenerationFailed(MlxdError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class StorageFailed(MlxdError):
    """The store could not write (disk full, file deleted, I/O error); the message says which."""

    status = 500
    type = "server_error"
    code = "storage_error"


class ModelLoadError(Exception):
    """A model source could not be resolved or loaded; the message says why and what to do."""


class UnsupportedModelError(ModelLoadError):
    """The model file is readable but uses something mlxd cannot serve (named in the message)."""
