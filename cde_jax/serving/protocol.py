"""The wire formats: OpenAI's embeddings API (`/v1/embeddings`, `/v1/models`) and
text-embeddings-inference's `/embed`, requests (pydantic models) and answers, errors included.

Both routes take texts or token ids. Token ids are embedded as given, as
`Context.encode_tokens` takes them: they hold [CLS], the prompt and [SEP], as
`model.tokenize(texts, prompt)` returns them, so `prompt_name` does not apply to them.
The role (query or document: the task prompt) is `prompt_name`, as TEI's `/embed` and
sentence-transformers' `encode` name it; OpenAI's API has no such field, so the OpenAI route
takes the same name as an extra field (the openai client sends it with `extra_body`).
"""

from __future__ import annotations

import base64
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from ..ops import l2_normalize
from ..validation import json_kind

Texts = list[str]
TokenIds = list[list[int]]
PromptName = Literal["query", "document"]


class ApiError(Exception):
    """An answer other than 200: status, message and OpenAI's error type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


def _token_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def sequences(value, field: str) -> list:
    """A request's input as a non-empty list of non-empty texts, or of token id lists; one
    text or one token id list is a list of one."""
    if isinstance(value, str) or _token_ids(value):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{field} must be a string, an array of strings, an array of token "
                         f"ids or an array of arrays of token ids, got {json_kind(value)}")
    if not value:
        raise ValueError(f"{field} is empty: send at least one text")
    for i, item in enumerate(value):
        if not (isinstance(item, str) and item) and not _token_ids(item):
            got = "an empty string" if item == "" else json_kind(item)
            raise ValueError(f"{field}[{i}] must be a non-empty string or array of token ids, "
                             f"got {got}")
    if len({isinstance(item, str) for item in value}) > 1:
        raise ValueError(f"{field} mixes texts and token ids")
    return value


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt_name: PromptName | None = Field(
        None, description="the role: the task prompt of queries (default) or documents")
    dimensions: int | None = Field(
        None, ge=1, description="keep the first N dimensions, renormalized: not what the "
                                "model was trained for (no Matryoshka loss), so retrieval "
                                "quality drops")
    truncate: bool = Field(True, description="cut inputs over max_seq_length (false: 413); "
                                             "TEI's default is false")

    @field_validator("input", "inputs", mode="before", check_fields=False)
    @classmethod
    def _sequences(cls, value, info: ValidationInfo):
        return sequences(value, info.field_name)


class EmbeddingsRequest(Request):
    """OpenAI's `POST /v1/embeddings`; `user` is accepted and ignored; `prompt_name`,
    `truncate` are ours."""

    input: Texts | TokenIds
    model: str = Field(description="the context's name (GET /v1/models lists them)")
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


class EmbedRequest(Request):
    """text-embeddings-inference's `POST /embed`; `model` (which context; default: the
    server's first) is ours: TEI serves one model."""

    inputs: Texts | TokenIds
    normalize: bool = True
    model: str | None = None


class ContextRequest(BaseModel):
    """Ours: `POST /v1/contexts`, a new context from a corpus's texts (a minicorpus sampled
    with `seed`, embedded by the server) or from base64 dataset embeddings made elsewhere
    by this model (little-endian float32, the minicorpus size of rows)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=80)  # a file name
    texts: Texts | None = None
    dataset_embeddings: str | None = None
    seed: int = Field(0, ge=0, description="the minicorpus sampling seed (texts)")

    @field_validator("texts", mode="before")
    @classmethod
    def _texts(cls, value):
        if value is not None and (not isinstance(value, list) or not all(
                isinstance(text, str) for text in value)):
            raise ValueError("texts must be an array of strings")
        return value if value is None else sequences(value, "texts")


def finish(rows_nd: np.ndarray, *, normalize: bool = True, dimensions: int | None = None
           ) -> np.ndarray:
    """The model's rows cut to `dimensions` (all: None), then L2-normalized (unless not)."""
    rows_nd = rows_nd[:, :dimensions]
    return l2_normalize(rows_nd) if normalize else rows_nd


def base64_floats(row_d: np.ndarray) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(row_d.astype("<f4").tobytes()).decode("ascii")


def embeddings_body(rows_nd: np.ndarray, model: str, encoding_format: str, tokens: int
                    ) -> dict:
    encode = base64_floats if encoding_format == "base64" else np.ndarray.tolist
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(row)}
                     for i, row in enumerate(rows_nd)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def models_body(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                        "owned_by": "cde-jax"} for name in names]}


# TEI's error types, by status (its body is {"error": message, "error_type": type}).
TEI_ERROR_TYPES = {429: "overloaded", 500: "backend", 503: "unhealthy"}


def error_body(error: ApiError, *, tei: bool) -> dict:
    if tei:
        return {"error": error.message,
                "error_type": TEI_ERROR_TYPES.get(error.status, "validation")}
    return {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}


def validation_error(errors: list[dict]) -> ApiError:
    """The first of pydantic's (FastAPI's) errors as one message naming the field."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}".rstrip(": "),
                        code="invalid_json")
    if first.get("type") == "value_error":  # ours (`sequences`): names the field itself
        return ApiError(400, str(first["ctx"]["error"]), param=loc[0] if loc else None)
    if not loc:
        return ApiError(400, f"the request body must be a JSON object: {first['msg']}")
    return ApiError(400, f"{'.'.join(loc)}: {first['msg']}", param=loc[0])
