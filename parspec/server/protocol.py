"""The OpenAI request bodies parspec accepts (OpenAI's field names plus vLLM's extra
sampling fields), the OpenAI-style error, and the mapping of a request to SamplingParams
with vLLM's semantics. Unknown fields are ignored, as vLLM does; fields parspec cannot
honour (echo, best_of > n, suffix, tools, ...) are refused by name."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from parspec.sampling import SamplingError, SamplingParams

MAX_LOGPROBS = 20  # vLLM's default max_logprobs

ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "RequestEntityTooLarge",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class APIError(Exception):
    """An error answered as OpenAI's JSON body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "APIError"),
                          "param": self.param, "code": self.status}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: usage in every chunk


class _SamplingRequest(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str | None = None  # None: the first served model name (as vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    best_of: int | None = None
    use_beam_search: bool = False
    prompt_logprobs: int | None = None
    user: str | None = None

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options can only be given when stream is true", "stream_options")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request(f"best_of={self.best_of} is not supported (only best_of == n)", "best_of")
        if self.use_beam_search:
            raise bad_request("beam search is not supported", "use_beam_search")
        if self.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs is not supported", "prompt_logprobs")

    def sampling_fields(self) -> dict[str, Any]:
        """The SamplingParams keyword arguments this request sets (absent ones keep vLLM's defaults)."""
        names = ("n", "seed", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "min_p",
                 "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens", "ignore_eos",
                 "include_stop_str_in_output", "skip_special_tokens")
        kw = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.logit_bias:
            kw["logit_bias"] = parse_logit_bias(self.logit_bias)
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)


PromptInput = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_SamplingRequest):
    prompt: PromptInput
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise bad_request("echo is not supported: the response holds the completion only", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise bad_request(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}", "logprobs")

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: one string or token list each (OpenAI allows a batch)."""
        p = self.prompt
        if isinstance(p, str):
            prompts = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise bad_request("prompt must not be empty", "prompt")
        return prompts

    def logprobs_param(self) -> int | None:
        return self.logprobs


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... reach the template
    role: str
    content: str | list[ContentPart] | None = None

    def as_template_message(self) -> dict:
        """vLLM's "string" content format: text parts joined by newlines; anything else refused."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_request(f"message content of type {part.type!r} is not supported (text only)",
                                      "messages")
                texts.append(part.text)
            content = "\n".join(texts)
        message = dict(self.model_extra or {})
        message.update(role=self.role, content=content if content is not None else "")
        return message


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    add_generation_prompt: bool = True
    echo: bool = False
    add_special_tokens: bool = False  # the chat template writes the special tokens itself (vLLM)

    def check(self) -> None:
        self.check_common()
        if self.tools or self.tool_choice not in (None, "none"):
            raise bad_request("tool calling is not supported", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request(f"response_format {self.response_format.get('type')!r} is not supported "
                              "(no guided decoding); use 'text'", "response_format")
        if self.echo:
            raise bad_request("echo is not supported", "echo")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}",
                                  "top_logprobs")
            if self.top_logprobs > 0 and not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_param(self) -> int | None:
        """vLLM: logprobs=true asks for the sampled token's logprob plus top_logprobs others."""
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_logit_bias(bias: dict[str, float]) -> dict[int, float]:
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = float(value)
        except (TypeError, ValueError):
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", "logit_bias") from None
    return out


def parse_body(model: type[_Body], obj: Any) -> _Body:
    """Validate a decoded JSON body; the first problem becomes a 400 naming the field."""
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise bad_request(*_describe(e.errors())) from None


def _describe(errors: list[dict]) -> tuple[str, str | None]:
    """The first validation error as (message, top-level field). A union field (prompt, stop,
    ...) fails once per member type; that is one wrong type, said once."""
    err = errors[0]
    loc = err["loc"]
    field = str(loc[0]) if loc else None
    if err["type"] == "missing":
        return f"missing field {'.'.join(map(str, loc))!r}", field
    if len(errors) > 1 and all(e["loc"][:1] == loc[:1] for e in errors) and len(loc) > 1 \
            and not isinstance(loc[1], int):
        return f"field {field!r} has the wrong type (got {err.get('input')!r:.80})", field
    return f"invalid field {'.'.join(map(str, loc))!r}: {err['msg']} (got {err.get('input')!r:.80})", field


def build_sampling_params(fields: dict[str, Any]) -> SamplingParams:
    """SamplingParams' own checks are the boundary; their message becomes the 400's."""
    try:
        return SamplingParams(**fields)
    except SamplingError as e:
        first = str(e).split(" ", 1)[0]
        raise bad_request(str(e), first if first in fields else None) from None
    except TypeError as e:  # a field this build's SamplingParams lacks
        raise bad_request(f"unsupported sampling field: {e}") from None

