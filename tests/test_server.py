"""`parspec serve` as a user runs it: a real uvicorn server in a subprocess on 127.0.0.1, the
official `openai` client and httpx against it, the bundled reference pair in float32 on CPU.
Greedy text must equal the offline API's; streams must add up to it; bad input is a 4xx
OpenAI-style JSON error and the server goes on serving; a disconnected stream is aborted,
its blocks freed, and /metrics counts it; the counters match the engine's own counts."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures", "reference")
TARGET = os.path.join(FIX, "target")
NAME = "parspec-ref"
MAX_MODEL_LEN = 512
SPEC = {"method": "eagle3", "model": os.path.join(FIX, "eagle3"), "num_speculative_tokens": 3}
MAX_BODY = 200_000

pytestmark = pytest.mark.skipif(not os.path.isdir(TARGET), reason="the reference pair is not in fixtures/")


def _prompts(n: int) -> list[str]:
    """Short, distinct code prompts (the pair was trained on Python source)."""
    heads = ["def add(a, b):\n", "class Point:\n    def __init__(self, x, y):\n", "import os\n\ndef main():\n",
             "for i in range(10):\n", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "def is_prime(n):\n", "with open(path) as f:\n", "def parse(line):\n    parts = line.split(','"]
    return [f"# task {i}\n{heads[i % len(heads)]}" for i in range(n)]


# --- the servers -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`parspec serve` in a subprocess; stopped with SIGINT like Ctrl-C."""

    def __init__(self, log_path: str, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "parspec.cli", "serve", "--model", TARGET, "--dtype", "float32",
               "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN), "--served-model-name", NAME,
               "--port", str(self.port), "--uvicorn-log-level", "warning", *args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def metrics(self) -> dict[str, float]:
        """/metrics as {'name{labels}': value}, labels sorted as prometheus-client writes them."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _m(name: str, **labels) -> str:
    labels = {"engine": "0", "model_name": NAME, **labels}
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The speculative server most tests share (EAGLE-3, K=3)."""
    s = Server(str(tmp_path_factory.mktemp("serve") / "server.log"), "--speculative-config", json.dumps(SPEC),
               "--max-num-seqs", "64", "--max-request-body", str(MAX_BODY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def offline():
    """The offline API without speculation: the reference every greedy output must equal."""
    from parspec import LLM

    return LLM(TARGET, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN)


def _offline(llm, prompts, max_tokens: int, **kw):
    from parspec import SamplingParams

    return llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw), use_tqdm=False)


# --- completions and chat ----------------------------------------------------------------------

def test_models_health_version(server):
    assert httpx.get(server.url + "/health").status_code == 200
    import parspec

    assert httpx.get(server.url + "/version").json() == {"version": parspec.__version__}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [NAME]


def test_completions_equal_offline(server, offline):
    prompts = _prompts(2)
    expected = _offline(offline, prompts, 16)
    client = server.client()
    for prompt, ref in zip(prompts, expected):
        out = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
        choice = out.choices[0]
        assert choice.text == ref.outputs[0].text
        assert choice.finish_reason == ref.outputs[0].finish_reason
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
        assert out.model == NAME and out.object == "text_completion"


def test_completion_stream_adds_up_with_usage(server, offline):
    prompt = _prompts(5)[4]
    ref = _offline(offline, [prompt], 24)[0]
    chunks = list(server.client().completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 2  # it really streamed
    assert "".join(c.choices[0].text for c in text_chunks) == ref.outputs[0].text
    assert text_chunks[-1].choices[0].finish_reason == ref.outputs[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert last.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_batch_of_prompts_in_order(server, offline):
    prompts = _prompts(3)
    expected = _offline(offline, prompts, 6)
    out = server.client().completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [r.outputs[0].text for r in expected]


def test_chat_equals_offline_streamed_and_not(server, offline):
    messages = [{"role": "system", "content": "You write Python."},
                {"role": "user", "content": "def reverse(s):"}]
    templated = offline.get_tokenizer().apply_chat_template(messages)
    ids = offline.get_tokenizer().encode(templated, add_special_tokens=False)
    ref = _offline(offline, [{"prompt_token_ids": ids}], 16)[0].outputs[0]
    client = server.client()
    out = client.chat.completions.create(model=NAME, messages=messages, max_completion_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_n_and_stop_strings(server, offline):
    """n greedy completions are n copies of the offline one; a stop string cuts the text."""
    prompt = _prompts(2)[1]
    ref = _offline(offline, [prompt], 12)[0].outputs[0].text
    out = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [ref, ref]
    stop = ref.strip()[:3]
    cut = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == ref[:ref.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_chat_logprobs(server, offline):
    out = server.client().chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "import sys"}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the emitted token is the most likely
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)
    done = server.client().completions.create(model=NAME, prompt="import sys", max_tokens=6, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert "".join(lp.tokens) == done.choices[0].text  # (no EOS in 6 greedy tokens here)
    assert len(lp.token_logprobs) == len(lp.tokens) == done.usage.completion_tokens
    assert all(v <= 0.0 for v in lp.token_logprobs) and all(len(t) >= 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


# --- bad input ---------------------------------------------------------------------------------

def _too_long_prompt() -> str:
    return "x = 1\n" * MAX_MODEL_LEN


BAD = [  # (path, body (dict, or bytes sent as is), status, the error's param or None, text in the message)
    ("/v1/completions", b"{not json", 400, None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", 400, None, "JSON object"),
    ("/v1/completions", {"model": NAME}, 400, "prompt", "missing"),
    ("/v1/completions", {"model": NAME, "prompt": 7}, 400, "prompt", "wrong type"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens", "ten"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": -5}, 400, "max_tokens", "-5"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "context"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "temperature": -0.5}, 400, "temperature", "-0.5"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "top_p": 1.5}, 400, "top_p", "1.5"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "n": 0}, 400, "n", "n must be"),
    ("/v1/completions", {"model": NAME, "prompt": _too_long_prompt(), "max_tokens": 4}, 400, "prompt", "tokens"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 2, 10**9]}, 400, "prompt", "out of range"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "echo": True}, 400, "echo", "echo"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"abc": 1}}, 400, "logit_bias", "abc"),
    # Refused by the engine at admission; streamed or not, still an HTTP error before any event.
    ("/v1/completions", {"model": NAME, "prompt": "a", "logit_bias": {"99999": 1}, "stream": True}, 400, None,
     "99999"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"model": NAME, "prompt": "a", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"content": "hi"}]}, 400, "messages", "role"),
    ("/v1/chat/completions", {"model": NAME, "messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens", "at least 1"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", None),
    ("/v1/completions", b'{"model": "x", "prompt": "' + b"a" * (MAX_BODY + 10) + b'"}', 413, None, "limit"),
    ("/v1/embeddings", {"model": NAME, "input": "a"}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,param,text", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_json_error(server, path, body, status, param, text):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        if isinstance(body, bytes):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == status and err["param"] == param
        if text is not None:
            assert text in err["message"]
        ok = http.post("/v1/completions", json={"model": NAME, "prompt": "def f():", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_openai_client_raises_on_bad_input(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=NAME, prompt="a", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])


# --- metrics -----------------------------------------------------------------------------------

def test_metrics_count_a_known_workload(server):
    """After sequential greedy requests, /metrics moved by exactly what the same requests
    do offline with the same speculation, one at a time: requests by finish reason, prompt
    and generation tokens, and vLLM's four spec-decode counters."""
    from parspec import LLM

    prompts, max_tokens = _prompts(3), [12, 6, 16]
    llm = LLM(TARGET, dtype="float32", device="cpu", max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
              speculative_config=SPEC)
    expected = [_offline(llm, [p], m)[0] for p, m in zip(prompts, max_tokens)]
    stats = llm.engine.stats
    before = server.metrics()
    client = server.client()
    for p, m in zip(prompts, max_tokens):
        client.completions.create(model=NAME, prompt=p, max_tokens=m, temperature=0)
    after = server.metrics()

    def moved(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    for reason in ("stop", "length"):
        want = sum(o.outputs[0].finish_reason == reason for o in expected)
        assert moved(_m("vllm:request_success_total", finished_reason=reason)) == want
    assert moved(_m("vllm:prompt_tokens_total")) == sum(len(o.prompt_token_ids) for o in expected)
    assert moved(_m("vllm:generation_tokens_total")) == sum(len(o.outputs[0].token_ids) for o in expected)
    assert moved(_m("vllm:time_to_first_token_seconds_count")) == len(prompts)
    assert moved(_m("vllm:e2e_request_latency_seconds_count")) == len(prompts)
    assert stats.num_drafts > 0
    assert moved(_m("vllm:spec_decode_num_drafts_total")) == stats.num_drafts
    assert moved(_m("vllm:spec_decode_num_draft_tokens_total")) == stats.num_draft_tokens
    assert moved(_m("vllm:spec_decode_num_accepted_tokens_total")) == stats.num_accepted_tokens
    per_pos = stats.num_accepted_tokens_per_pos + [0] * (3 - len(stats.num_accepted_tokens_per_pos))
    assert [moved(_m("vllm:spec_decode_num_accepted_tokens_per_pos_total", position=i)) for i in range(3)] == per_pos
    # parspec's own: steps per verified depth (all at K = 3 without "auto")
    assert llm.engine.depth_steps[3] > 0 and sum(llm.engine.depth_steps[:3]) == 0
    assert [moved(_m("parspec:spec_decode_depth_steps_total", depth=k)) for k in range(4)] == llm.engine.depth_steps
    assert after[_m("vllm:kv_cache_usage_perc")] == 0.0
    assert after[_m("vllm:num_requests_running")] == 0 and after[_m("vllm:num_requests_waiting")] == 0


# --- load --------------------------------------------------------------------------------------

def test_load_1000_requests_at_concurrency_64(server, offline):
    """1,000 greedy requests, 64 at a time, speculation on, half of them streamed: none lost
    or failed, each equal to the offline non-speculative output, the KV pool full after."""
    prompts, max_tokens = _prompts(64), 6
    expected = [o.outputs[0].text for o in _offline(offline, prompts, max_tokens)]
    before = server.metrics()
    jobs = [(i % len(prompts), i % 2 == 1) for i in range(1000)]

    async def one(client, prompt_index, stream):
        kw = dict(model=NAME, prompt=prompts[prompt_index], max_tokens=max_tokens, temperature=0)
        if not stream:
            return (await client.completions.create(**kw)).choices[0].text
        parts = []
        async for chunk in await client.completions.create(stream=True, **kw):
            parts.append(chunk.choices[0].text)
        return "".join(parts)

    async def run():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        gate = asyncio.Semaphore(64)

        async def bounded(job):
            async with gate:
                return await one(client, *job)

        try:
            return await asyncio.gather(*(bounded(j) for j in jobs), return_exceptions=True)
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(run())
    elapsed = time.monotonic() - start
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of 1000 failed, e.g. {failed[0]!r}"
    wrong = [i for i, ((p, _), text) in enumerate(zip(jobs, results)) if text != expected[p]]
    assert not wrong, f"{len(wrong)} outputs differ from the offline ones, e.g. job {wrong[0]}"
    after = server.metrics()
    done = sum(after.get(_m("vllm:request_success_total", finished_reason=r), 0)
               - before.get(_m("vllm:request_success_total", finished_reason=r), 0) for r in ("stop", "length"))
    assert done == 1000
    assert after[_m("vllm:kv_cache_usage_perc")] == 0.0, "blocks still held after the load"
    assert after[_m("vllm:num_requests_running")] == 0 and after[_m("vllm:num_requests_waiting")] == 0
    assert after[_m("vllm:spec_decode_num_drafts_total")] > before[_m("vllm:spec_decode_num_drafts_total")]
    print(f"\n1000 requests at concurrency 64 in {elapsed:.1f}s")


# --- capacity, disconnects, start-up errors ----------------------------------------------------

@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    """One sequence at a time and no queue: the second concurrent request is refused."""
    s = Server(str(tmp_path_factory.mktemp("serve-small") / "server.log"), "--max-num-seqs", "1",
               "--max-queue-len", "0")
    yield s
    s.stop()


def _wait_for(server: Server, predicate, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if predicate(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_queue_full_503_and_disconnect_aborts(small_server):
    s = small_server
    abort_key = _m("vllm:request_success_total", finished_reason="abort")
    aborts_before = s.metrics().get(abort_key, 0)
    body = {"model": NAME, "prompt": "def main():\n", "max_tokens": 490, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=s.url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            busy = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
            assert busy.status_code == 503
            assert busy.json()["error"]["code"] == 503 and "capacity" in busy.json()["error"]["message"]
            running = s.metrics()
            assert running[_m("vllm:num_requests_running")] == 1
            assert running[_m("vllm:kv_cache_usage_perc")] > 0
        # The stream is closed mid-way: the request is aborted and its blocks freed.
        m = _wait_for(s, lambda m: m.get(abort_key, 0) > aborts_before and m[_m("vllm:kv_cache_usage_perc")] == 0)
        assert m[abort_key] == aborts_before + 1
        assert m[_m("vllm:kv_cache_usage_perc")] == 0.0
        assert m[_m("vllm:num_requests_running")] == 0
        ok = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200


def test_non_streaming_disconnect_aborts(small_server):
    s = small_server
    abort_key = _m("vllm:request_success_total", finished_reason="abort")
    aborts_before = s.metrics().get(abort_key, 0)
    body = {"model": NAME, "prompt": "def main():\n", "max_tokens": 490, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(s.url + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    m = _wait_for(s, lambda m: m.get(abort_key, 0) > aborts_before and m[_m("vllm:kv_cache_usage_perc")] == 0)
    assert m[abort_key] == aborts_before + 1 and m[_m("vllm:kv_cache_usage_perc")] == 0.0


def test_bad_speculative_config_at_start_up_exits_with_one_line():
    cmd = [sys.executable, "-m", "parspec.cli", "serve", "--model", TARGET, "--port", str(_free_port()),
           "--device", "cpu", "--speculative-config", '{"method": "bogus", "num_speculative_tokens": 2}']
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip() == ("parspec: error: unknown speculative method 'bogus'; "
                                "choose one of ngram, draft_model, eagle3, spd")


@pytest.mark.parametrize("args,message", [
    (["--speculative-config", "{not json"], "not valid JSON"),
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 0}'], "num_speculative_tokens"),
    (["--speculative-config", '{"method": "eagle3", "num_speculative_tokens": 2}'], "needs \"model\""),
    (["--model", "/nonexistent/model"], "/nonexistent/model"),
    (["--max-queue-len", "-1"], "--max-queue-len"),
])
def test_bad_start_up_is_one_clear_line(capsys, args, message):
    """The same path in-process (no interpreter start-up per case): exit code 2, one line."""
    from parspec.cli import main

    argv = ["serve", "--port", str(_free_port()), "--device", "cpu"]
    if "--model" not in args:
        argv += ["--model", TARGET]
    assert main(argv + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("parspec: error:") and "\n" not in err and message in err
