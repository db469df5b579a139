# Request bodies (pydantic): OpenAI completions and chat with vLLM's extra sampling fields, tokenize, jobs.
"""Every field is type- and range-checked here, before anything reaches the engine; the engine's own checks
(prompt length against the context, token ids against the vocabulary) run next and fail the same way (400).

Strict types: ``"max_tokens": "8"`` or ``"stream": 1`` are errors, not coerced. Unknown fields are ignored
(clients send vendor extras), but fields this server cannot honour (``suffix``, ``logit_bias``, ``tools``, a
JSON ``response_format``...) are refused by name rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeloom.inference import SamplingParams

INT64 = 2**63
TokenId = Annotated[int, Field(ge=0, lt=2**31)]
Text = Annotated[str, Field(max_length=1 << 20)]
TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=1 << 18)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


def _refuse(data: Any, names: tuple[str, ...]) -> Any:
    """Fields we cannot honour: refused by name when set to anything but null / empty / their no-op value."""
    if isinstance(data, dict):
        for name in names:
            value = data.get(name)
            if value not in (None, {}, [], "", {"type": "text"}):
                raise ValueError(f"{name} is not supported by this server; leave it out")
    return data


class StreamOptions(_Strict):
    include_usage: bool = False  # one last chunk with usage and no choices
    continuous_usage_stats: bool = False  # usage so far on every chunk (vLLM)


class SamplingFields(_Strict):
    """The sampling fields shared by completions, chat, jobs, WebSocket and gRPC requests."""

    n: int = Field(1, ge=1, le=128)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=-1, le=1 << 20)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=100.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = Field(None, ge=-INT64, lt=INT64)
    stop: Optional[Union[Annotated[str, Field(min_length=1, max_length=512)],
                         Annotated[list[Annotated[str, Field(min_length=1, max_length=512)]],
                                   Field(max_length=16)]]] = None
    stop_token_ids: Optional[Annotated[list[TokenId], Field(max_length=64)]] = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=1 << 20)
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM's extra: token ids of the prompt and of each choice

    def sampling_params(self, max_tokens: int, logprobs: int | None = None) -> SamplingParams:
        """The engine's params (its defaults for fields left out); ValueError names a bad combination."""
        given = {name: getattr(self, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                       "presence_penalty", "frequency_penalty", "seed")}
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
                              stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
                              logprobs=logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
                              **{k: v for k, v in given.items() if v is not None})


class CompletionRequest(SamplingFields):
    """POST /v1/completions (and the body of POST /v1/jobs and WebSocket requests)."""

    model: Optional[Annotated[str, Field(max_length=512)]] = None
    prompt: Union[Text, TokenList, Annotated[list[Text], Field(min_length=1, max_length=1024)],
                  Annotated[list[TokenList], Field(min_length=1, max_length=1024)]]
    max_tokens: Optional[int] = Field(16, ge=1, le=1 << 20)
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    echo: bool = False
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[Annotated[str, Field(max_length=512)]] = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        data = _refuse(data, ("suffix", "logit_bias", "prompt_logprobs", "guided_json", "guided_regex"))
        if isinstance(data, dict) and data.get("best_of") not in (None, data.get("n", 1)):
            raise ValueError("best_of is not supported by this server (use n); leave it out or set it equal to n")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given when stream is true")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs would need prompt logprobs, which this server does not compute; "
                             "use one or the other")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one text or token list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[Text, Annotated[list[TextPart], Field(max_length=256)]]] = None
    name: Optional[Annotated[str, Field(max_length=256)]] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    model: Optional[Annotated[str, Field(max_length=512)]] = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]
    max_tokens: Optional[int] = Field(None, ge=1, le=1 << 20)  # None: up to the context length
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=1 << 20)  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    add_generation_prompt: bool = True  # end the prompt with the assistant's turn
    user: Optional[Annotated[str, Field(max_length=512)]] = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse(data, ("tools", "tool_choice", "functions", "function_call", "logit_bias", "response_format",
                              "guided_json", "guided_regex", "audio", "prediction"))

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options can only be given when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self


class TokenizeRequest(_Strict):
    """POST /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: Optional[Annotated[str, Field(max_length=512)]] = None
    prompt: Optional[Text] = None
    messages: Optional[Annotated[list[ChatMessage], Field(min_length=1, max_length=1024)]] = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Strict):
    """POST /detokenize."""

    model: Optional[Annotated[str, Field(max_length=512)]] = None
    tokens: Annotated[list[TokenId], Field(max_length=1 << 18)]


class JobRequest(CompletionRequest):
    """POST /v1/jobs: a completion request run in the background (one prompt; no stream)."""

    @model_validator(mode="after")
    def _one_prompt(self) -> JobRequest:
        if self.stream:
            raise ValueError("a job is read by polling GET /v1/jobs/{id}; leave stream out")
        if len(self.prompts()) != 1:
            raise ValueError("a job takes one prompt (a string or a list of token ids)")
        return self
