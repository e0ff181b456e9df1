"""Prometheus metrics under vLLM's names and labels (vllm/v1/metrics/loggers.py,
vllm/v1/spec_decode/metrics.py), so dashboards built for `vllm serve` read parspec as is.

Every series carries the labels model_name and engine ("0"), as vLLM's do. Counters are
exposed with the `_total` suffix prometheus-client adds (vllm:prompt_tokens_total, ...).
Each app owns its CollectorRegistry, so several servers can live in one process (tests)."""

from __future__ import annotations

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from parspec.compiled_kernels import num_compiled_variants

FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's bucket boundaries, so histograms from both servers can be compared bucket by bucket.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0]
LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0]


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out
            out.append(m * scale)
        scale *= 10


class ServerMetrics:
    """The server's metrics. AsyncLLMEngine calls the observe_* methods from its thread
    (prometheus-client's metrics are thread-safe); /metrics renders them."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_name: str, max_model_len: int, num_speculative_tokens: int = 0):
        prometheus_client.disable_created_metrics()  # no *_created series: twice the output, nothing reads them
        self.registry = CollectorRegistry()
        labels, values = ["model_name", "engine"], [model_name, "0"]
        r = self.registry

        def counter(name, doc, extra=()):
            return Counter(name, doc, labels + list(extra), registry=r)

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        self.running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc",
                                     "GPU KV-cache usage. 1 means 100 percent usage. "
                                     "DEPRECATED in vLLM: use vllm:kv_cache_usage_perc instead.")
        self.preemptions = counter("vllm:num_preemptions",
                                   "Cumulative number of preemption from the engine.").labels(*values)
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.").labels(*values)
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.").labels(*values)
        success = counter("vllm:request_success", "Count of successfully processed requests.", ["finished_reason"])
        self.request_success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}

        token_buckets = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.request_max_tokens = histogram("vllm:request_params_max_tokens",
                                            "Histogram of the max_tokens request parameter.", token_buckets)
        self.request_n = histogram("vllm:request_params_n", "Histogram of the n request parameter.",
                                   [1, 2, 5, 10, 20])
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds.", TPOT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TPOT_BUCKETS)
        self.request_tpot = histogram("vllm:request_time_per_output_token_seconds",
                                      "Histogram of time_per_output_token_seconds per request.", TPOT_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS)

        # Read at each scrape: a rise after the warm-up is a request that waited for a compile.
        gauge("parspec:triton_kernel_variants", "Triton kernel variants compiled in the server process."
              ).set_function(num_compiled_variants)

        self.spec = num_speculative_tokens > 0
        if self.spec:
            self.spec_drafts = counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.").labels(*values)
            self.spec_draft_tokens = counter("vllm:spec_decode_num_draft_tokens",
                                             "Number of draft tokens.").labels(*values)
            self.spec_accepted = counter("vllm:spec_decode_num_accepted_tokens",
                                         "Number of accepted tokens.").labels(*values)
            depth = counter("parspec:spec_decode_depth_steps", "Speculative decode steps by the depth k they "
                            "verified (K, or the adaptive choice with num_speculative_tokens auto).", ["depth"])
            self.spec_depth = [depth.labels(*values, str(k)) for k in range(num_speculative_tokens + 1)]
            self._seen_depth = [0] * (num_speculative_tokens + 1)
            per_pos = counter("vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                              ["position"])
            self.spec_per_pos = [per_pos.labels(*values, str(i)) for i in range(num_speculative_tokens)]
        # Engine totals seen so far: counters advance by the difference at each observation.
        self._seen_preemptions = 0
        self._seen_spec = (0, 0, 0, [])

    # --- per request (AsyncLLMEngine) -----------------------------------------------------------
    def observe_first_token(self, ttft: float, num_prompt_tokens: int) -> None:
        self.ttft.observe(ttft)
        self.prompt_tokens.inc(num_prompt_tokens)

    def observe_inter_token(self, seconds: float) -> None:
        """One observation per request per engine step that gave it tokens, as vLLM's v1 counts."""
        self.tpot.observe(seconds)
        self.itl.observe(seconds)

    def observe_generation_tokens(self, num: int) -> None:
        self.generation_tokens.inc(num)

    def observe_finished(self, reason: str, e2e: float, decode_time: float | None, num_prompt_tokens: int,
                         num_generation_tokens: int, max_tokens: int | None, n: int) -> None:
        self.request_success[reason if reason in self.request_success else "error"].inc()
        self.e2e.observe(e2e)
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(num_generation_tokens)
        self.request_n.observe(n)
        if max_tokens:
            self.request_max_tokens.observe(max_tokens)
        if decode_time is not None:
            self.decode_time.observe(decode_time)
            if num_generation_tokens > 1:
                self.request_tpot.observe(decode_time / (num_generation_tokens - 1))

    # --- engine state (after every engine iteration) -------------------------------------------
    def observe_engine(self, engine, num_pending: int) -> None:
        """Gauges from the scheduler and the block pool; counters from the engine's totals.
        ``num_pending``: requests handed in but not yet given to the engine (they wait too)."""
        sched, blocks = engine.scheduler, engine.blocks
        self.running.set(len(sched.running))
        self.waiting.set(len(sched.waiting) + num_pending)
        usage = 1.0 - blocks.num_free_blocks / blocks.num_blocks
        self.kv_usage.set(usage)
        self.gpu_cache_usage.set(usage)
        if sched.num_preemptions > self._seen_preemptions:
            self.preemptions.inc(sched.num_preemptions - self._seen_preemptions)
            self._seen_preemptions = sched.num_preemptions
        if self.spec:
            self._observe_spec(engine.stats)
            for k, total in enumerate(engine.depth_steps[:len(self.spec_depth)]):
                if total > self._seen_depth[k]:
                    self.spec_depth[k].inc(total - self._seen_depth[k])
                self._seen_depth[k] = total

    def _observe_spec(self, stats) -> None:
        drafts, draft_tokens, accepted, per_pos = self._seen_spec
        self.spec_drafts.inc(max(0, stats.num_drafts - drafts))  # max: engine.reset_stats() restarts its totals
        self.spec_draft_tokens.inc(max(0, stats.num_draft_tokens - draft_tokens))
        self.spec_accepted.inc(max(0, stats.num_accepted_tokens - accepted))
        for i, total in enumerate(stats.num_accepted_tokens_per_pos[:len(self.spec_per_pos)]):
            seen = per_pos[i] if i < len(per_pos) else 0
            if total > seen:
                self.spec_per_pos[i].inc(total - seen)
        self._seen_spec = (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                           list(stats.num_accepted_tokens_per_pos))

    def render(self) -> bytes:
        return generate_latest(self.registry)
