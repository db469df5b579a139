# Response bodies (pydantic): completions, chat, their stream chunks, usage, logprobs, models, tokenize, jobs.
"""The OpenAI wire formats field for field (``null`` fields are sent, as OpenAI and vLLM send them), plus
vLLM's optional ``token_ids`` / ``prompt_token_ids`` when a request sets ``return_token_ids``.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: one entry per output token."""

    text_offset: list[int] = []
    token_logprobs: list[Optional[float]] = []
    tokens: list[str] = []
    top_logprobs: list[Optional[dict[str, float]]] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    stop_reason: Optional[int | str] = None  # vLLM: the stop string or token id that ended it
    token_ids: Optional[list[int]] = None  # with return_token_ids
    prompt_token_ids: Optional[list[int]] = None  # with return_token_ids (first chunk of a stream)


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprob]] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    stop_reason: Optional[int | str] = None
    token_ids: Optional[list[int]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: Optional[list[int]] = None


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None
    token_ids: Optional[list[int]] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pipeloom"
    root: Optional[str] = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class JobEvent(BaseModel):
    """One step of a job's output: the new tokens and text of one choice (sequence numbers start at 1)."""

    sequence_number: int
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None


class JobChoice(BaseModel):
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[Literal["stop", "length", "abort"]] = None


class Job(BaseModel):
    """GET /v1/jobs/{id}: the status, the events after the cursor asked for, and the result once finished."""

    id: str
    object: Literal["job"] = "job"
    created: int
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    events: list[JobEvent] = []
    cursor: int = 0  # pass as ?after= to get only what comes next
    choices: Optional[list[JobChoice]] = None  # the whole result, once finished
    usage: Optional[Usage] = None
    prompt_token_ids: Optional[list[int]] = None
    error: Optional[dict] = None
