"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:  # pragma: no cover
    from ensemble_serve.shared.voting import Candidate, VoteResult

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)


class Metrics:
    """Requests, latency, tokens, per-member votes and failures, agreement."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ensemble_requests", "Requests answered, by model kind and status.", ["kind", "status"], registry=r
        )
        self.latency = Histogram(
            "ensemble_request_latency_seconds",
            "Time to answer a request, by model kind.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "ensemble_tokens", "Tokens processed, by kind (prompt or completion).", ["kind"], registry=r
        )
        self.member_votes = Counter(
            "ensemble_member_votes",
            "Chains per member by outcome: agreed (with the consensus), disagreed, excluded.",
            ["member", "outcome"],
            registry=r,
        )
        self.member_failures = Counter(
            "ensemble_member_failures", "Member generations that failed.", ["member"], registry=r
        )
        self.agreement = Histogram(
            "ensemble_agreement",
            "Share of the vote the consensus answer got.",
            buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
            registry=r,
        )
        self.reloads = Counter(
            "ensemble_population_reloads", "Population refreshes, by result.", ["result"], registry=r
        )
        self.inflight = Gauge(
            "ensemble_engine_requests_inflight", "Generation requests inside the engine now.", registry=r
        )
        self.generation = Gauge(
            "ensemble_population_generation", "Generation of the population being served.", registry=r
        )
        self.route_fallbacks = Counter(
            "ensemble_route_fallbacks",
            "Ensemble requests voted unrouted because the router's gates were unusable.",
            registry=r,
        )
        self.adaptive_waves = Counter(
            "ensemble_adaptive_waves", "Waves sampled by adaptive fan-out (ensemble.adaptive).", registry=r
        )
        self.adaptive_chains = Counter(
            "ensemble_adaptive_chains",
            "Chains of adaptive fan-outs: sampled ('spent') or left out because the vote was settled ('saved').",
            ["kind"],
            registry=r,
        )
        self.adaptive_stops = Counter(
            "ensemble_adaptive_stops",
            "Adaptive fan-outs by why sampling stopped (confident, decided, exhausted).",
            ["reason"],
            registry=r,
        )
        self.member_available = Gauge(
            "ensemble_member_available",
            "1 if the member can be asked now, 0 if it cannot (every remote server that serves it is down).",
            ["member"],
            registry=r,
        )
        self.server_up = Gauge(
            "ensemble_remote_server_up",
            "1 if the remote vLLM server is up, 0 if it is down (remote mode only).",
            ["server"],
            registry=r,
        )

    def track_inflight(self, fn: Callable[[], float]) -> None:
        self.inflight.set_function(fn)

    def observe_request(self, kind: str, seconds: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(kind=kind, status="ok").inc()
        self.latency.labels(kind=kind).observe(seconds)
        self.tokens.labels(kind="prompt").inc(prompt_tokens)
        self.tokens.labels(kind="completion").inc(completion_tokens)

    def observe_error(self, kind: str, status: int) -> None:
        self.requests.labels(kind=kind, status=str(status)).inc()

    def observe_vote(self, result: VoteResult, candidates: Sequence[Candidate]) -> None:
        winners = (
            set(result.groups[list(result.votes).index(result.answer)]) if result.answer in result.votes else set()
        )
        excluded = set(result.excluded)
        for i, c in enumerate(candidates):
            outcome = "excluded" if i in excluded else ("agreed" if i in winners else "disagreed")
            self.member_votes.labels(member=c.member, outcome=outcome).inc()
        if result.agreement is not None:
            self.agreement.observe(result.agreement)

    def observe_availability(
        self, members: Sequence[str], unavailable: Sequence[str], servers: Sequence[dict] | None
    ) -> None:
        """Set the availability gauges: every member of `members` (1, or 0 if in `unavailable`) and, in remote
        mode, every server of `servers` (`RemoteBackend.health()["servers"]`: 1 if up). Members and servers
        no longer listed lose their series."""
        down = set(unavailable)
        self.member_available.clear()
        for m in members:
            self.member_available.labels(member=m).set(0 if m in down else 1)
        self.server_up.clear()
        for s in servers or ():
            self.server_up.labels(server=s["url"]).set(1 if s["up"] else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
