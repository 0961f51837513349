"""Routing: which remote servers serve which member of the population, and which of them may be asked now.

A member may be served by several servers; each request goes to the up server among them with
the fewest requests in flight from this backend. The base model (member None) is asked of any
up server. A member whose servers are all down is unavailable: asking for it raises
`MemberUnavailableError` (503, with a `Retry-After` of the next retry), and a name that is not
a member at all raises `RemoteError` (502). The context length is the smallest of the servers'.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from ensemble_serve.engine.remote.discovery import RemoteDiscoveryError
from ensemble_serve.engine.remote.servers import Found, RemoteServer
from ensemble_serve.engine.remote.wire import RemoteError
from ensemble_serve.errors import MemberUnavailableError
from ensemble_serve.shared.population import Population


class Router:
    """The members of `population` routed to `servers` (after `apply`); `clock` times the retries it reports."""

    def __init__(self, population: Population, servers: Sequence[RemoteServer], clock: Callable[[], float]):
        self.population = population
        self.servers = servers
        self.by_member: dict[str, list[RemoteServer]] = {}
        self.max_model_len = 0
        self._clock = clock

    def apply(self, population: Population, found: dict[str, Found]) -> None:
        """Route `population`'s members to the servers that serve them; refuse members no server has."""
        by_member = {name: [s for s in self.servers if name in found[s.url].models] for name in population.names}
        missing = [name for name, servers in by_member.items() if not servers]
        if missing:
            served = {s.url: sorted(found[s.url].models) for s in self.servers}
            raise RemoteDiscoveryError(
                f"member(s) {missing} of generation {population.manifest.generation} are served by none of the "
                f"remote vLLM servers (they serve {served}); start a server with --lora-modules NAME=PATH for them "
                "or load them with its POST /v1/load_lora_adapter"
            )
        for s in self.servers:
            s.adopt(found[s.url])
        self.max_model_len = min(f.max_model_len for f in found.values())
        self.by_member = by_member
        self.population = population

    def reroute(self) -> None:
        """Re-route the current population after a server's members changed (it came back up)."""
        self.by_member = {name: [s for s in self.servers if name in s.members] for name in self.population.names}
        lens = [s.max_model_len for s in self.servers if s.max_model_len]
        if lens:
            self.max_model_len = min(lens)

    def servers_of(self, member: str | None) -> list[RemoteServer]:
        """The servers that are up and serve `member` (every up server for the base model).

        Raises `MemberUnavailableError` (503) when every server that serves it is down, and
        `RemoteError` for a name that is not a member of the population.
        """
        if member is None:
            candidates = list(self.servers)
        else:
            try:
                candidates = self.by_member[member]
            except KeyError:
                raise RemoteError(f"no remote vLLM server serves member {member!r}") from None
        up = [s for s in candidates if s.up]
        if up:
            return up
        raise self._unavailable(member, candidates)

    def pick(self, member: str | None) -> RemoteServer:
        """The server to send a request for `member` to: the first of the least busy up servers."""
        return min(self.servers_of(member), key=lambda s: s.inflight)

    def unavailable_members(self) -> list[str]:
        """The population's members that no up server serves now, in manifest order."""
        return [m for m in self.population.names if not any(s.up for s in self.by_member.get(m, ()))]

    def lost_with(self, s: RemoteServer) -> list[str]:
        """The members served by `s` that no up server serves now (what `s` going down took away)."""
        return [m for m in self.unavailable_members() if s in self.by_member.get(m, ())]

    def _unavailable(self, member: str | None, down: list[RemoteServer]) -> MemberUnavailableError:
        what = "the base model" if member is None else f"member {member!r}"
        if not down:
            served = {s.url: sorted(s.members) for s in self.servers}
            return MemberUnavailableError(
                f"{what} is unavailable: no remote vLLM server serves it now (they serve {served})"
            )
        now = self._clock()
        waits = [max(0.0, s.retry_at - now) for s in down if s.retry_at is not None]
        servers = "; ".join(f"{s.url} ({s.reason})" for s in down)
        retry = f"; next retry in {min(waits):.1f} s" if waits else ""
        headers = {"Retry-After": str(max(1, math.ceil(min(waits))))} if waits else None
        return MemberUnavailableError(
            f"{what} is unavailable: its remote vLLM server{'s are' if len(down) > 1 else ' is'} down: {servers}{retry}",
            headers=headers,
        )
