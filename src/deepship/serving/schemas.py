"""The API's wire format: the error every refused request gets, and the request/response models that
document /v1/predict in the OpenAPI schema (/docs).

Bodies are parsed by hand (deepship.serving.requests), not by these models: a bad request must get an
error that names the item and says what to send, which pydantic's generic 422 does not.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field


class ApiError(Exception):
    """A request problem with its HTTP status, a stable code and a message that says what to send."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_response(request_id: str | None, status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}, "request_id": request_id}, status_code=status)


class TextRequest(BaseModel):
    inputs: list[str] = Field(description="texts to classify, at most max_items", min_length=1)


class ImageRequest(BaseModel):
    images: list[str] = Field(description="base64-encoded image files (a data: URL prefix is allowed)", min_length=1)


class PredictionOut(BaseModel):
    label: str
    confidence: float
    probs: dict[str, float]
    abstained: bool
    truncated: bool = Field(False, description="the text was cut to max_text_chars before prediction")


class PredictResponse(BaseModel):
    predictions: list[PredictionOut]
    model_version: str
    registry_version: str | None = Field(None, description="NAME:VERSION in the model registry (only when serving "
                                                           "--model registry:...)")
    request_id: str


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
    request_id: str | None


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": ErrorResponse} for status in (400, 413, 415, 503)}
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"oneOf": [TextRequest.model_json_schema(), ImageRequest.model_json_schema()]}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}
