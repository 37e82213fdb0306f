"""Prometheus metrics of one server (its own registry, so several servers in one process stay apart)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("phi3_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("phi3_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generated_tokens = Counter("phi3_generated_tokens", "Tokens generated", registry=r)
        self.queue_depth = Gauge("phi3_queue_depth", "Requests waiting for a slot", registry=r)
        self.active_slots = Gauge("phi3_active_slots", "Sequences being decoded", registry=r)
        self.finished = Counter("phi3_sequences_finished", "Sequences that left their slot, by reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("phi3_time_to_first_token_seconds", "Submit to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("phi3_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("phi3_request_latency_seconds", "Submit to last token",
                                 buckets=LATENCY_BUCKETS, registry=r)

    def watch(self, engine) -> None:
        """The gauges read the engine's state when scraped."""
        self.active_slots.set_function(lambda: len(engine.active))
        self.queue_depth.set_function(lambda: len(engine.waiting))

    # ---- called by the engine thread ------------------------------------------------------------

    def observe_token(self, seq, now: float) -> None:
        self.generated_tokens.inc()
        if seq.generated == 1:
            self.prompt_tokens.inc(len(seq.req.prompt_ids))
            self.ttft.observe(now - seq.req.submitted)
        else:
            self.itl.observe(now - seq.last_token_time)

    def observe_finish(self, seq) -> None:
        reason = "cancelled" if seq.req.cancelled and not seq.done else (seq.row.finish_reason or "length")
        self.finished.labels(reason).inc()
        if seq.generated:
            self.latency.observe(seq.last_token_time - seq.req.submitted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
