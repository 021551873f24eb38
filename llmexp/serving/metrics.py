"""The server's Prometheus metrics, in a registry of their own (two engines in one process do not collide).

The engine records what generation does (queue depth, batch sizes, forward steps, TTFT,
end-to-end latency, tokens); the HTTP app records requests by model and status code.
``GET /metrics`` renders ``registry`` in Prometheus' text format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "llmexp_serve"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    """Every metric ``llmexp serve`` exports; names start with ``llmexp_serve_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests answered, by served model and status code "
                                "(401: no or a wrong API key; 413: a body above --max-body-bytes; 499: the client "
                                "left before its answer)",
                                ["model", "status"], registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge(f"{PREFIX}_running", "Requests in the running batch", registry=r)
        self.batch_size = Histogram(f"{PREFIX}_batch_size", "Rows in each forward step", ["kind"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.forward_steps = Counter(f"{PREFIX}_forward_steps", "Model forward passes: prefill, decode, or with a "
                                     "draft model its rounds' target (verify) and draft passes", ["kind"],
                                     registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From submission to the first generated token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_latency_seconds", "From submission to the last generated token",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.speculative_tokens = Counter(f"{PREFIX}_speculative_tokens", "Tokens the draft model proposed, and "
                                          "those the target accepted", ["kind"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens prefilled", ["model"], registry=r)
        self.generated_tokens = Counter(f"{PREFIX}_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.generations = Counter(f"{PREFIX}_generations", "Generations ended, by finish reason "
                                   "(stop, length, cancelled, error)", ["model", "finish_reason"], registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
