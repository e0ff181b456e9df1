"""/v1/completions and /v1/chat/completions: a validated request becomes one engine request
per prompt, their deltas come back merged on one queue, and leave as OpenAI's response
objects, whole or as server-sent-event chunks. Checks happen before anything is queued, so
a bad request is a 400 and costs the engine nothing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from parspec.config import ConfigError
from parspec.engine.async_engine import AsyncLLMEngine, EngineStopped, QueueFull, RequestRejected
from parspec.sampling import SamplingParams
from parspec.sequence import RequestDelta
from parspec.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, bad_request,
                                     build_sampling_params, parse_body)


@dataclass
class Prompt:
    token_ids: list[int]
    text: str | None


@dataclass
class Choice:
    """One completion as it accumulates: OpenAI's choice index, text, tokens, logprobs."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    text_offset: int = 0  # completions logprobs: where the next chunk's text starts


class Generation:
    """The engine requests of one HTTP request (one per prompt, n completions each), their
    deltas merged on one queue, and their abort when the client leaves or the handler ends."""

    def __init__(self, engine: AsyncLLMEngine, response_id: str, prompts: list[Prompt],
                 params: list[SamplingParams]):
        self.engine = engine
        self.prompts = prompts
        self.params = params
        self.request_ids = [f"{response_id}-{i}" for i in range(len(prompts))]
        self.prompt_of = {rid: i for i, rid in enumerate(self.request_ids)}
        self.n = params[0].n
        self.sink: asyncio.Queue = asyncio.Queue()
        self.open = {rid: sp.n for rid, sp in zip(self.request_ids, params)}  # completions not finished

    def submit(self) -> None:
        for i, rid in enumerate(self.request_ids):
            prompt = {"prompt_token_ids": self.prompts[i].token_ids, "prompt": self.prompts[i].text}
            try:
                self.engine.add_request(rid, prompt, self.params[i], self.sink)
            except (QueueFull, EngineStopped) as e:
                for submitted in self.request_ids[:i]:
                    self.engine.abort(submitted)
                self.open = {}
                raise APIError(503, str(e)) from None

    def choice_index(self, delta: RequestDelta) -> int:
        """OpenAI numbers the choices of a batch prompt-major: prompt i, completion j -> i * n + j."""
        return self.prompt_of[delta.request_id] * self.n + delta.index

    async def deltas(self) -> AsyncIterator[RequestDelta]:
        while any(self.open.values()):
            item = await self.sink.get()
            if isinstance(item, RequestRejected):
                self.open.pop(item.request_id, None)
                raise bad_request(item.message)
            if item.finished and item.request_id in self.open:
                self.open[item.request_id] -= 1
            yield item

    def abort_unfinished(self) -> None:
        for rid, remaining in self.open.items():
            if remaining:
                self.engine.abort(rid)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p.token_ids) for p in self.prompts)


async def _watch_disconnect(request, generation: Generation) -> None:
    """A client that goes away aborts its requests at once: their KV blocks are freed."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            generation.abort_unfinished()
            return


class OpenAIServing:
    """What both endpoints share: the engine, the tokenizer, the served names, the limits."""

    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str]):
        self.engine = engine
        self.llm = engine.engine
        self.tokenizer = self.llm.tokenizer
        self.served_model_names = served_model_names
        self.max_model_len = self.llm.max_model_len

    # --- checks -------------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.served_model_names[0]
        if requested not in self.served_model_names:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.served_model_names))}", "model")
        return requested

    def max_tokens(self, requested: int | None, prompt_len: int, param: str) -> int:
        """vLLM's rule: the prompt and max_tokens must fit the context; unset means all that is left."""
        if prompt_len >= self.max_model_len:
            raise bad_request(f"the prompt has {prompt_len} tokens but the model's context is "
                              f"{self.max_model_len} tokens (max_model_len), with room needed for at least "
                              "one generated token", "prompt" if param == "max_tokens" else "messages")
        if requested is None:
            return self.max_model_len - prompt_len
        if requested < 1:
            raise bad_request(f"{param} must be at least 1, got {requested}", param)
        if prompt_len + requested > self.max_model_len:
            raise bad_request(f"this model's context is {self.max_model_len} tokens (max_model_len), but "
                              f"{prompt_len + requested} were requested ({prompt_len} in the prompt, {requested} "
                              f"in {param}); shorten the prompt or lower {param}", param)
        return requested

    def tokenize(self, prompt: str | list[int], add_special_tokens: bool) -> Prompt:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise bad_request("this server has no tokenizer: send token ids as the prompt", "prompt")
            return Prompt(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens), prompt)
        vocab = self.llm.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise bad_request(f"prompt token ids out of range [0, {vocab}): {bad[:5]}", "prompt")
        return Prompt(list(prompt), None)

    def token_str(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"  # vLLM's spelling without a tokenizer
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def start(self, response_id: str, prompts: list[Prompt], params: list[SamplingParams]) -> Generation:
        generation = Generation(self.engine, response_id, prompts, params)
        generation.submit()
        return generation


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _raise_failed(choices: list[Choice]) -> None:
    """A completion that ended in an engine error or an abort has no response to give."""
    for c in choices:
        if c.finish_reason == "error":
            raise APIError(500, f"generation failed: {c.error}")
    for c in choices:
        if c.finish_reason == "abort":
            raise APIError(503, "the request was aborted (the server is shutting down)")


class Endpoint:
    """The flow both endpoints share: parse -> prompts and params -> engine -> response."""

    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, serving: OpenAIServing):
        self.s = serving

    async def handle(self, http_request, body) -> dict | AsyncIterator[str]:
        """The response body (a dict), or for stream=true an iterator of SSE lines whose first
        item has been awaited already, so admission errors are still HTTP errors."""
        req = self.parse(body)
        model = self.s.model_name(req.model)
        prompts, params = self.prepare(req)
        response_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        generation = self.s.start(response_id, prompts, params)
        watcher = asyncio.ensure_future(_watch_disconnect(http_request, generation))
        if not req.stream:
            try:
                return await self.collect(req, model, response_id, generation)
            finally:
                watcher.cancel()
                generation.abort_unfinished()
        stream = self.stream(req, model, response_id, generation, watcher)
        try:
            first = await stream.__anext__()
        except BaseException:
            await stream.aclose()
            raise
        return _prepend(first, stream)

    async def collect(self, req, model: str, response_id: str, generation: Generation) -> dict:
        choices = [Choice(i) for i in range(len(generation.prompts) * generation.n)]
        async for delta in generation.deltas():
            c = choices[generation.choice_index(delta)]
            c.text.append(delta.new_text)
            c.token_ids.extend(delta.new_token_ids)
            if delta.new_logprobs:
                c.logprobs.extend(delta.new_logprobs)
            if delta.finished:
                c.finish_reason, c.stop_reason, c.error = delta.finish_reason, delta.stop_reason, delta.error
        _raise_failed(choices)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {"id": response_id, "object": self.object_name, "created": int(time.time()), "model": model,
                "choices": [self.final_choice(req, c) for c in choices],
                "usage": _usage(generation.num_prompt_tokens, completion_tokens)}

    async def stream(self, req, model: str, response_id: str, generation: Generation,
                     watcher: asyncio.Future) -> AsyncIterator[str]:
        created = int(time.time())
        choices = [Choice(i) for i in range(len(generation.prompts) * generation.n)]
        num_output = 0

        def chunk(choice_objs: list[dict], usage: dict | None = None) -> str:
            obj = {"id": response_id, "object": self.chunk_object_name, "created": created, "model": model,
                   "choices": choice_objs}
            if req.include_usage or req.continuous_usage:
                obj["usage"] = usage
            return _sse(obj)

        try:
            started = False
            async for delta in generation.deltas():
                if not started:  # after the first delta: the request was admitted
                    started = True
                    for opening in self.opening_chunks(choices):
                        yield chunk([opening])
                c = choices[generation.choice_index(delta)]
                num_output += len(delta.new_token_ids)
                if delta.finished and delta.finish_reason in ("error", "abort"):
                    c.finish_reason, c.error = delta.finish_reason, delta.error
                    if delta.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {delta.error}").body())
                    break
                if not (delta.new_text or delta.finished or (delta.new_token_ids and delta.new_logprobs)):
                    continue  # tokens that make no text yet (half a UTF-8 character): nothing to say
                usage = (_usage(generation.num_prompt_tokens, num_output) if req.continuous_usage else None)
                yield chunk([self.delta_choice(req, c, delta)], usage)
            else:
                if req.include_usage:
                    yield chunk([], _usage(generation.num_prompt_tokens, num_output))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            generation.abort_unfinished()

    # --- per endpoint ---------------------------------------------------------------------------
    def parse(self, body):
        raise NotImplementedError

    def prepare(self, req) -> tuple[list[Prompt], list[SamplingParams]]:
        raise NotImplementedError

    def opening_chunks(self, choices: list[Choice]) -> list[dict]:
        return []

    def final_choice(self, req, c: Choice) -> dict:
        raise NotImplementedError

    def delta_choice(self, req, c: Choice, delta: RequestDelta) -> dict:
        raise NotImplementedError

    def params_for(self, req, max_tokens: int) -> SamplingParams:
        fields = req.sampling_fields()
        fields["max_tokens"] = max_tokens
        logprobs = req.logprobs_param()
        if logprobs is not None:
            fields["logprobs"] = logprobs
        return build_sampling_params(fields)


async def _prepend(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        yield first
        async for item in rest:
            yield item
    finally:
        await rest.aclose()


class CompletionEndpoint(Endpoint):
    object_name = "text_completion"
    chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def parse(self, body) -> CompletionRequest:
        req = parse_body(CompletionRequest, body)
        req.check()
        return req

    def prepare(self, req: CompletionRequest):
        prompts = [self.s.tokenize(p, req.add_special_tokens) for p in req.prompts()]
        params = [self.params_for(req, self.s.max_tokens(req.max_tokens, len(p.token_ids), "max_tokens"))
                  for p in prompts]
        return prompts, params

    def logprobs_obj(self, c: Choice, entries: list) -> dict | None:
        """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in entries:
            token = self.s.token_str(lp.token_id)
            out["tokens"].append(token)
            out["token_logprobs"].append(lp.logprob)
            top = {self.s.token_str(t): v for t, v in lp.top}
            top.setdefault(token, lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(c.text_offset)
            c.text_offset += len(token)
        return out

    def final_choice(self, req: CompletionRequest, c: Choice) -> dict:
        logprobs = self.logprobs_obj(c, c.logprobs) if req.logprobs is not None else None
        return {"index": c.index, "text": "".join(c.text), "logprobs": logprobs,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def delta_choice(self, req: CompletionRequest, c: Choice, delta: RequestDelta) -> dict:
        logprobs = (self.logprobs_obj(c, delta.new_logprobs or [])
                    if req.logprobs is not None else None)
        return {"index": c.index, "text": delta.new_text, "logprobs": logprobs,
                "finish_reason": delta.finish_reason if delta.finished else None,
                "stop_reason": delta.stop_reason if delta.finished else None}


class ChatEndpoint(Endpoint):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def parse(self, body) -> ChatCompletionRequest:
        req = parse_body(ChatCompletionRequest, body)
        req.check()
        return req

    def prepare(self, req: ChatCompletionRequest):
        if self.s.tokenizer is None:
            raise bad_request("this server has no tokenizer, so no chat template")
        messages = [m.as_template_message() for m in req.messages]
        try:
            text = self.s.tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        except ConfigError as e:
            raise bad_request(str(e), "messages") from None
        prompt = self.s.tokenize(text, req.add_special_tokens)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.s.max_tokens(req.requested_max_tokens(), len(prompt.token_ids), param)
        return [prompt], [self.params_for(req, max_tokens)]

    def logprobs_obj(self, entries: list) -> dict:
        def item(token_id: int, logprob: float) -> dict:
            token = self.s.token_str(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                            for lp in entries]}

    def opening_chunks(self, choices: list[Choice]) -> list[dict]:
        return [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for c in choices]

    def final_choice(self, req: ChatCompletionRequest, c: Choice) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": self.logprobs_obj(c.logprobs) if req.logprobs else None,
                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

    def delta_choice(self, req: ChatCompletionRequest, c: Choice, delta: RequestDelta) -> dict:
        return {"index": c.index, "delta": {"content": delta.new_text} if delta.new_text else {},
                "logprobs": self.logprobs_obj(delta.new_logprobs or []) if req.logprobs else None,
                "finish_reason": delta.finish_reason if delta.finished else None,
                "stop_reason": delta.stop_reason if delta.finished else None}
