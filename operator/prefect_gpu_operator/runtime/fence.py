"""Leadership that fences itself: a replica writes to Prefect only while its peering record is
fresh.

kopf's peering pauses a replica when one of higher priority is alive, but it is not leader
election: a replica cut off from the API server hears of nobody and keeps running, while its
record ages and another replica takes over once the record expires (``lifetime`` seconds after
its last keepalive). Its resyncs would then undo the new leader's writes. So every replica reads
its own record (every ``POLL_SECONDS``) and stops writing to Prefect before the record can
expire: at its last keepalive plus 80 % of the lifetime, later than kopf's next keepalive is due
(every lifetime minus 5 to 10 s, or 1 s for short lifetimes) and well before a standby takes
over. The record's ``lastseen`` is this replica's own clock, so skew between machines does not
matter.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["POLL_SECONDS", "Fence", "Fenced", "seniority_priority"]

log = logging.getLogger(__name__)

_SAFE_SHARE = 0.8
"""Of the lifetime, how long after its last keepalive a replica may still write."""
POLL_SECONDS = 1.0
"""How often a replica reads its own peering record."""


def seniority_priority(started_at: float, tiebreak: int) -> int:
    """A peering priority by age: the replica started first is active, so a starting replica
    (a rollout, the one replacing a deleted pod) never takes over from a running one, and only
    the active one's going causes a takeover (the oldest standby's). ``tiebreak`` (0-999, drawn
    at random) separates replicas started in the same millisecond: equal priorities would pause
    them all. Negative, as kopf makes the highest priority active; well inside 2**53."""
    if not 0 <= tiebreak < 1000:
        raise ValueError(f"tiebreak must be in 0..999, not {tiebreak}")
    return -(round(started_at * 1000) * 1000) + tiebreak


class Fenced(RuntimeError):
    """This replica may no longer write to Prefect: another one may be active."""


class Fence:
    """Open while this replica's peering record is fresh; always open when running alone."""

    def __init__(self, identity: str | None, lifetime: float) -> None:
        self.identity = identity  # None: standalone, nobody else writes
        self.lifetime = lifetime
        self._until: datetime.datetime | None = None

    def observe(self, peering: Mapping[str, Any]) -> None:
        """Take our record's last keepalive from the peering object (its ``status``)."""
        if self.identity is None:
            return
        record = (peering.get("status") or {}).get(self.identity) or {}
        try:
            lastseen = datetime.datetime.fromisoformat(str(record["lastseen"]))
        except (KeyError, ValueError):
            return  # not announced yet, or torn: keep what we knew
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=datetime.UTC)
        self._until = lastseen + datetime.timedelta(seconds=self.lifetime * _SAFE_SHARE)

    def check(self) -> None:
        """Raise Fenced unless this replica may write now."""
        if self.identity is None:
            return
        now = datetime.datetime.now(datetime.UTC)
        if self._until is None or now >= self._until:
            raise Fenced(
                "not writing to Prefect: this replica's peering record has not been renewed "
                f"for {self.lifetime * _SAFE_SHARE:.0f} s (cut off from the API server?); "
                "another replica may be active"
            )
