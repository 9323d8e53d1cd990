"""The GPU nodes as the operator last saw them.

Seeded by a listing at start-up, kept current by the node watch, and listed again by resyncs:
a watch that restarts (a re-list after 410 Gone, a peering takeover) reports no deletions, so
only a fresh listing notices a node deleted meanwhile. Nodes the watch reports while a listing is
in flight keep what the watch said: it is newer than the listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prefect_gpu_operator.adapters.kube import gpu_node
from prefect_gpu_operator.domain.desired import GPUNode
from prefect_gpu_operator.runtime.ports import KubeApi

__all__ = ["NodeChange", "NodeView"]

log = logging.getLogger(__name__)

NodeChange = tuple[GPUNode | None, GPUNode | None]
"""A node before and after (None: absent)."""


class NodeView:
    """GPU nodes by name; ``observe`` and ``refresh`` return what changed."""

    def __init__(self, kube: KubeApi) -> None:
        self._kube = kube
        self.nodes: dict[str, GPUNode] = {}
        self._listed_at = -float("inf")
        self._listing = asyncio.Lock()
        self._touched: list[set[str]] = []  # per listing in flight: names the watch reported

    def seed(self, nodes: Iterable[GPUNode]) -> None:
        self.nodes = {node.name: node for node in nodes}
        self._listed_at = time.monotonic()

    def observe(self, body: Mapping[str, Any], deleted: bool = False) -> NodeChange | None:
        """Record a watch event; the change, or None when nothing that matters changed."""
        node = gpu_node(body)
        for touched in self._touched:
            touched.add(node.name)
        return self._apply(node.name, None if deleted else node)

    async def refresh(self, max_age: float) -> list[NodeChange]:
        """List every node again unless a listing is younger than ``max_age`` seconds; prune
        nodes that are gone. A failed listing changes nothing (the next resync tries again)."""
        async with self._listing:
            if time.monotonic() - self._listed_at < max_age:
                return []
            started = time.monotonic()
            with self._tracking() as touched:
                try:
                    listed = {node.name: node for node in await self._kube.list_gpu_nodes()}
                except Exception as error:  # the API server may be down: keep what we have
                    log.warning("nodes not listed (%s); keeping the current view", error)
                    return []
            self._listed_at = started
        changes = [
            change
            for name in (self.nodes.keys() | listed.keys()) - touched
            if (change := self._apply(name, listed.get(name))) is not None
        ]
        return changes

    def _apply(self, name: str, node: GPUNode | None) -> NodeChange | None:
        before = self.nodes.get(name)
        if node is None:
            self.nodes.pop(name, None)
            return (before, None) if before is not None else None
        if before == node:
            return None  # keep the same object: verdict caches key on identity
        self.nodes[name] = node
        return before, node

    @contextlib.contextmanager
    def _tracking(self) -> Iterator[set[str]]:
        touched: set[str] = set()
        self._touched.append(touched)
        try:
            yield touched
        finally:
            self._touched.remove(touched)
