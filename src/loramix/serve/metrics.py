"""The server's /metrics in the Prometheus text format (prometheus-client), one registry per app.

loramix_queue_depth                      jobs waiting for a slot
loramix_active_slots / loramix_slots     slots holding a job / all slots
loramix_generated_tokens_total           tokens chosen (rate() of it is tokens/s)
loramix_tokens_per_second                the same over the last `window_s` seconds
loramix_time_to_first_token_seconds      histogram: queue + prefill, per job
loramix_inter_token_latency_seconds      histogram: between two tokens of one job
loramix_requests_finished_total{reason}  stop, length, cancelled, timeout
loramix_requests_rejected_total{status}  503 (queue full), 413 (body too large), 408 (body read timeout)
loramix_kv_blocks / _used / _free        the KV pool's blocks: all, held by rows, free (idle cached ones count)
loramix_preemptions_total                rows preempted when the pool ran out (recomputed later)
loramix_prefix_cache_hit_tokens_total    prompt tokens taken from the prefix cache instead of computed
loramix_expert_mean_scaling{expert}      per expert, the mean scaling over the active rows and layers of the
                                         last `window` decode steps: what the mixture does in production
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import torch

__all__ = ["Metrics"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """What the engine reports (first_token, inter_token, tokens, step, finished) and the app's rejections."""

    def __init__(self, expert_names: list[str], *, window: int = 256, window_s: float = 10.0) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.expert_names = list(expert_names)
        self.queue_depth = Gauge("loramix_queue_depth", "Jobs waiting for a slot", registry=self.registry)
        self.active_slots = Gauge("loramix_active_slots", "Slots holding a job", registry=self.registry)
        self.slots = Gauge("loramix_slots", "Sequence slots of the batch", registry=self.registry)
        self.generated = Counter("loramix_generated_tokens", "Tokens generated", registry=self.registry)
        self.ttft = Histogram(
            "loramix_time_to_first_token_seconds",
            "From submission to the first token (queue + prefill)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "loramix_inter_token_latency_seconds",
            "Between two tokens of one job",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished_total = Counter(
            "loramix_requests_finished", "Jobs that left their slot", ["reason"], registry=self.registry
        )
        self.rejected = Counter(
            "loramix_requests_rejected", "Requests refused before generation", ["status"], registry=self.registry
        )
        self.kv_blocks = Gauge("loramix_kv_blocks", "Blocks of the KV cache pool", registry=self.registry)
        self.kv_used = Gauge("loramix_kv_blocks_used", "KV blocks held by rows", registry=self.registry)
        self.kv_free = Gauge(
            "loramix_kv_blocks_free", "KV blocks free (cached blocks no row holds count)", registry=self.registry
        )
        self.preemptions = Counter(
            "loramix_preemptions", "Rows preempted when the KV pool ran out", registry=self.registry
        )
        self.prefix_hits = Counter(
            "loramix_prefix_cache_hit_tokens", "Prompt tokens reused from the prefix cache", registry=self.registry
        )
        self._lock = threading.Lock()
        self._steps: deque[torch.Tensor] = deque(maxlen=window)
        self._token_times: deque[tuple[float, int]] = deque()
        self._window_s = window_s
        self.registry.register(_Windowed(self))

    def bind(self, engine: Any) -> None:
        """Read the queue depth and occupancy from `engine` at every scrape."""
        self.queue_depth.set_function(lambda: engine.queued)
        self.active_slots.set_function(lambda: engine.active)
        self.slots.set(engine.max_batch)
        self.kv_blocks.set(engine.blocks["total"])
        self.kv_used.set_function(lambda: engine.blocks["used"])
        self.kv_free.set_function(lambda: engine.blocks["free"])

    # ------------------------------------------------------------------ events (the engine's thread)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def tokens(self, n: int) -> None:
        self.generated.inc(n)
        now = time.monotonic()
        with self._lock:
            self._token_times.append((now, n))
            while self._token_times and self._token_times[0][0] < now - self._window_s:
                self._token_times.popleft()

    def step(self, active: int, expert_scaling: torch.Tensor) -> None:
        """One decode step: `expert_scaling` [N] is the mean scaling of each expert over the active rows."""
        with self._lock:
            self._steps.append(expert_scaling.detach().cpu())

    def preempted(self) -> None:
        self.preemptions.inc()

    def prefix_hit(self, tokens: int) -> None:
        self.prefix_hits.inc(tokens)

    def finished(self, reason: str) -> None:
        self.finished_total.labels(reason).inc()

    def reject(self, status: int) -> None:
        self.rejected.labels(str(status)).inc()

    # ------------------------------------------------------------------ read at scrape time

    def window(self) -> tuple[float, list[float] | None]:
        """(tokens per second over the last window_s seconds, per-expert mean scaling over the last steps)."""
        now = time.monotonic()
        with self._lock:
            recent = sum(n for t, n in self._token_times if t >= now - self._window_s)
            steps = list(self._steps)
        experts = torch.stack(steps).mean(0).tolist() if steps else None
        return recent / self._window_s, experts

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _Windowed:
    """A prometheus collector for the windowed values (computed when scraped)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Any:
        from prometheus_client.core import GaugeMetricFamily

        rate, experts = self.metrics.window()
        yield GaugeMetricFamily(
            "loramix_tokens_per_second", "Tokens generated per second over the recent window", value=rate
        )
        family = GaugeMetricFamily(
            "loramix_expert_mean_scaling",
            "Mean scaling of each expert over the active rows and layers of the recent decode steps",
            labels=["expert"],
        )
        if experts is not None:
            for name, value in zip(self.metrics.expert_names, experts):
                family.add_metric([name], value)
        yield family
