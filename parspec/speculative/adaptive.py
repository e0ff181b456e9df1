"""Adaptive speculation length: each decode step's depth k (0..K) chosen from the running
requests' recent acceptance and the step's measured cost at that batch size.

Why: a verify step feeds ``B * (k + 1)`` tokens. At batch 1 the step is bound by reading the
weights, so deep speculation is nearly free and pays; at high concurrency the step is bound by
compute and every rejected draft is wasted work, so the best depth falls, to 0 when acceptance
is poor. A fixed K is right at one point only.

The rule: choose ``k`` maximising the expected goodput ``sum_r E_r(k) / cost(bucket, k)``,
where ``E_r(k) = 1 + sum_{i<k} prod_{j<=i} a_r[j]`` is request r's expected tokens per step
(``a_r[j]`` its recent conditional acceptance of draft j, an exponential moving average that
starts from the population's) and ``cost`` is the measured wall time of a steady decode step
at that batch bucket and depth (also a moving average). Costs are learnt online: a bucket's
first steps walk the candidate depths from K down, and later every ``explore_every``-th step
re-measures a neighbour of the current choice, so the choice follows the load. Speculation
stays lossless at any k: fewer drafts are verified, by the same rule.

Per request: every request in a step is verified at the step's k (the target's cost is
shared by the batch, so a request's extra drafts cost nothing once the step is that deep);
its acceptance weighs its vote for k.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


def candidate_depths(k_max: int) -> list[int]:
    """0..3, then every other depth up to K (always K itself): few enough to learn each cost quickly."""
    return sorted({k for k in (0, 1, 2, 3, 5, 7, 10, 15) if k <= k_max} | {k_max})


def expected_tokens(acceptance: list[float], k: int) -> float:
    """Tokens a step emits on average with k drafts, given the conditional acceptance of each
    draft position (the target's own token always counts)."""
    total, alive = 1.0, 1.0
    for i in range(k):
        alive *= acceptance[i]
        total += alive
    return total


@dataclass
class _Acceptance:
    rates: list[float]  # conditional acceptance of draft position i, EMA


@dataclass
class _BucketCosts:
    seconds: dict[int, float] = field(default_factory=dict)  # depth -> EMA of a steady step's wall time
    steps: int = 0
    current: int | None = None
    probe_up: bool = True


class AdaptiveDepth:
    def __init__(self, k_max: int, *, prior_acceptance: float = 0.6, smoothing: float = 0.25,
                 explore_every: int = 16):
        if k_max < 1:
            raise ValueError(f"adaptive speculation needs a maximum depth >= 1, got {k_max}")
        self.k_max = k_max
        self.prior_acceptance = prior_acceptance
        self.population_smoothing = smoothing / 16
        self.outlier = 4.0
        self.candidates = candidate_depths(k_max)
        self.smoothing = smoothing
        self.explore_every = explore_every
        self.population = _Acceptance([prior_acceptance] * k_max)
        self.requests: dict[int, _Acceptance] = {}
        self.buckets: dict[int, _BucketCosts] = {}
        # (bucket, chosen k) of the latest decode steps, for reports and tests (bounded: a server runs for days)
        self.history: deque[tuple[int, int]] = deque(maxlen=4096)

    # --- acceptance ----------------------------------------------------------------------
    def observe(self, seq_id: int, num_drafts: int, num_accepted: int) -> None:
        """A verified step of one request: drafts 0..num_accepted-1 accepted, the next one (if
        any was drafted) rejected. Positions past the first rejection tell nothing."""
        if num_drafts == 0:
            return
        mine = self.requests.setdefault(seq_id, _Acceptance(list(self.population.rates)))
        # The population hears every request every step (64 observations a step at batch 64), so it
        # moves far slower than one request's estimate, or the last few requests would set it.
        for est, rate in ((mine, self.smoothing), (self.population, self.population_smoothing)):
            for i in range(min(num_accepted + 1, num_drafts)):
                hit = 1.0 if i < num_accepted else 0.0
                est.rates[i] += rate * (hit - est.rates[i])

    def release(self, seq_id: int) -> None:
        self.requests.pop(seq_id, None)

    def goodput_tokens(self, seq_ids: list[int], k: int) -> float:
        return sum(expected_tokens(self.requests.get(s, self.population).rates, k) for s in seq_ids)

    # --- cost ----------------------------------------------------------------------------
    def record_cost(self, bucket: int, k: int, seconds: float) -> None:
        """A steady step's wall time. A sample over ``outlier`` times the estimate (a kernel
        compiled, a graph captured, a pause of the host) is not the step's cost and is dropped;
        a first sample that was one is replaced by the next, faster one."""
        costs = self.buckets.setdefault(bucket, _BucketCosts())
        old = costs.seconds.get(k)
        if old is None or seconds * self.outlier < old:
            costs.seconds[k] = seconds
        elif seconds <= self.outlier * old:
            costs.seconds[k] = old + self.smoothing * (seconds - old)

    def forget_acceptance(self) -> None:
        """Back to the prior acceptance (after warm-up's dummy requests)."""
        self.population = _Acceptance([self.prior_acceptance] * self.k_max)
        self.requests.clear()

    # --- the choice ----------------------------------------------------------------------
    def choose(self, seq_ids: list[int], bucket: int) -> int:
        costs = self.buckets.setdefault(bucket, _BucketCosts())
        costs.steps += 1
        unmeasured = [k for k in reversed(self.candidates) if k not in costs.seconds]
        if unmeasured:  # learn the bucket's costs first, deepest first (the usual winner at low load)
            k = unmeasured[0]
        else:
            k = max(self.candidates, key=lambda d: self.goodput_tokens(seq_ids, d) / costs.seconds[d])
            costs.current = k
            if costs.steps % self.explore_every == 0:  # re-measure a neighbour: loads and acceptance drift
                k = self._neighbour(costs, k)
        self.history.append((bucket, k))
        return k

    def current(self, seq_ids: list[int], bucket: int) -> int:
        """The best depth by what is known, without counting a step or exploring (for steps
        whose cost is not measured: those that also feed context chunks). A bucket not fully
        measured borrows the costs of the nearest one that is; with none, K."""
        known = [b for b, c in self.buckets.items() if all(k in c.seconds for k in self.candidates)]
        if not known:
            return self.k_max
        costs = self.buckets[min(known, key=lambda b: (abs(b - bucket), b))]
        return max(self.candidates, key=lambda d: self.goodput_tokens(seq_ids, d) / costs.seconds[d])

    def _neighbour(self, costs: _BucketCosts, k: int) -> int:
        i = self.candidates.index(k)
        costs.probe_up = not costs.probe_up
        j = i + 1 if costs.probe_up else i - 1
        if not 0 <= j < len(self.candidates):
            j = i - 1 if j > i else i + 1
        return self.candidates[j] if 0 <= j < len(self.candidates) else k
