"""GPU time of the engine's step phases, measured with CUDA events (never host timers).

The engine marks phase boundaries on the stream when a ``StepEvents`` is attached
(``LLMEngine.step_events``); nothing is read back until ``totals()``, so measuring adds
no synchronisation to the step. On CPU the marks are host timestamps (there is no
asynchrony to hide there)."""

from __future__ import annotations

import time

import torch


class StepEvents:
    """Per step: ``begin`` -> ``drafted`` -> ``verified`` -> ``end``; totals in milliseconds.

    draft = (begin..drafted) + (verified..end): proposing at the start of a step and drafting
    right after verification; verify = (drafted..verified): the target forward + verification."""

    PHASES = ("begin", "drafted", "verified", "end")

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: list[dict] = []

    def mark(self, phase: str) -> None:
        if phase == "begin":
            self.steps.append({})
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.steps[-1][phase] = ev
        else:
            self.steps[-1][phase] = time.perf_counter()

    def _ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def totals(self) -> dict:
        """Synchronises once, then sums the phases over every complete step."""
        if self.cuda:
            torch.cuda.synchronize()
        draft = verify = 0.0
        n = 0
        for s in self.steps:
            if len(s) != len(self.PHASES):
                continue
            draft += self._ms(s["begin"], s["drafted"]) + self._ms(s["verified"], s["end"])
            verify += self._ms(s["drafted"], s["verified"])
            n += 1
        return {"steps": n, "draft_ms": draft, "verify_ms": verify}

    def reset(self) -> None:
        self.steps.clear()
