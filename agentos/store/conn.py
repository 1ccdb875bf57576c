"""The one connection every store repository shares: client, keys, scripts, batcher.

:class:`agentos.store.Store` builds one :class:`Conn` and hands it to each repository
(:mod:`~agentos.store.specs`, :mod:`~agentos.store.inbox`, ...), which take nothing else
from each other: what several of them need (the client, the key layout, the Lua scripts,
the script batcher, the retention, whether the server is a cluster) is here, typed, and
the steps they share are functions over it in :mod:`agentos.store.steps`. What checks
the server itself is here too: PING, that a plain URL names no cluster node and a
cluster URL a healthy cluster, and the refresh of a cluster's slot map after a node
failed (:meth:`Conn.refresh_topology`).
"""

from __future__ import annotations

import logging
import time
from importlib import resources

from redis import exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from agentos.store.batching import ScriptBatcher
from agentos.store.errors import StoreUnavailable, reason, translate
from agentos.store.keys import Keys
from agentos.store.raw import RawClient
from agentos.store.records import Retention

__all__ = ["Conn", "Scripts", "load_script"]

log = logging.getLogger("agentos.store")


def load_script(name: str) -> str:
    """The source of ``lua/<name>.lua``."""
    return resources.files("agentos.store").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """Every Lua script of the store, registered once on the client (``lua/*.lua``)."""

    def __init__(self, client: RawClient) -> None:
        def reg(name: str) -> AsyncScript:
            script: AsyncScript = client.register_script(load_script(name))
            return script

        self.lease_acquire = reg("lease_acquire")
        self.lease_renew = reg("lease_renew")
        self.lease_release = reg("lease_release")  # compare-and-delete, reused by snapshots
        self.fenced = reg("fenced_ops")
        self.inbox_send = reg("inbox_send")
        self.inbox_read = reg("inbox_read")
        self.heartbeat = reg("daemon_heartbeat")
        self.kv_commit = reg("kv_commit")
        self.kv_begin = reg("kv_begin")
        self.quota_admit = reg("quota_admit")
        self.quota_settle = reg("quota_settle")
        self.quota_renew = reg("quota_renew")
        self.quota_publish = reg("quota_publish")
        self.quota_charge = reg("quota_charge")
        self.wait_park = reg("wait_park")
        self.wait_arm = reg("wait_arm")
        self.wait_answer = reg("wait_answer")
        self.wait_event = reg("wait_event")
        self.wait_claim = reg("wait_claim")
        self.wait_clear = reg("wait_clear")
        self.due_unclaim = reg("due_unclaim")
        self.agent_wake = reg("agent_wake")
        self.inbox_dead = reg("inbox_dead")
        self.inbox_drop = reg("inbox_drop")
        self.inbox_redrive = reg("inbox_redrive")
        self.task_outcome = reg("task_outcome")
        self.model_throttle = reg("model_throttle")


class Conn:
    """One agentos namespace on one Redis server or one Redis Cluster, as the
    repositories see it. Built by :class:`agentos.store.Store`; closed by it."""

    def __init__(self, client: RawClient, keys: Keys, display_url: str, *, cluster: bool) -> None:
        self.r: RawClient = client
        self.keys = keys
        self.display_url = display_url
        # On a cluster one script or transaction may only touch keys of one slot: the
        # copies that go to fleet-wide streams are written in a step of their own.
        self.cluster = cluster
        self.scripts = Scripts(client)
        self.batch = ScriptBatcher(client)
        self.retention = Retention()
        self.topology_stale = False  # a node failed: re-read the slot map (cluster)
        self._topology_read_at = 0.0

    async def refresh_topology(self) -> None:
        """Re-read the cluster's slot map after a node failed, at most twice a second.

        redis-py's own way (flagging the client for a full re-initialisation) also sends
        ``COMMAND`` to its default node and fails every call while that node is the dead
        one: during a failover then no lease on the healthy masters could be renewed.
        Only the slot map is refreshed here, from any node that answers; until the
        replica has taken over, calls for the dead master's slots fail and the others
        go through.
        """
        now = time.monotonic()
        if now - self._topology_read_at < 0.5:
            return
        self._topology_read_at = now
        try:
            await self.r.nodes_manager.initialize()
        except Exception as e:
            log.debug("cluster slot map not refreshed: %s", reason(e))
            return
        alive = {n.name for n in self.r.get_primaries()}
        if self.r.get_default_node() is None or self.r.get_default_node().name not in alive:
            self.r.replace_default_node()
        self.topology_stale = False

    async def initialize_cluster(self) -> None:
        try:
            await self.r.initialize()
        except rexc.AuthenticationError as e:
            raise StoreUnavailable(
                f"Redis at {self.display_url} refused the credentials: {reason(e)}"
            ) from None
        except (rexc.RedisError, rexc.RedisClusterException, OSError) as e:
            text = reason(e)
            if "username-password" in text or "WRONGPASS" in text or "NOAUTH" in text:
                raise StoreUnavailable(
                    f"Redis at {self.display_url} refused the credentials: {text}"
                ) from None
            if (
                "cluster mode is not enabled" in text.lower()
                or "cluster support disabled" in text.lower()
            ):
                raise StoreUnavailable(
                    f"Redis at {self.display_url} is a single server, not a cluster: "
                    "use a redis:// URL for it"
                ) from None
            if "slots" in text.lower() and "covered" in text.lower():
                raise StoreUnavailable(
                    f"Redis Cluster at {self.display_url} does not serve every slot "
                    f"({text}); fix the cluster (CLUSTER INFO, --cluster check) first"
                ) from None
            raise StoreUnavailable(
                f"cannot reach Redis Cluster at {self.display_url}: {text}"
            ) from None
        await self.check_cluster_state()

    @translate
    async def check_cluster_state(self) -> None:
        """Every master serves its slots and every slot is served: otherwise some agents'
        keys cannot be reached at all."""
        per_node = await self.r.cluster_info(target_nodes=RedisCluster.PRIMARIES)
        infos = list(per_node.values()) if "cluster_state" not in per_node else [per_node]
        for info in infos:
            assigned = int(info.get("cluster_slots_assigned", 0))
            if info.get("cluster_state") != "ok" or assigned < 16384:
                raise StoreUnavailable(
                    f"Redis Cluster at {self.display_url} is not ok (cluster_state "
                    f"{info.get('cluster_state')}, {assigned} of 16384 slots assigned); fix "
                    "the cluster first (CLUSTER INFO, valkey-cli --cluster check)"
                )

    @translate
    async def check_not_cluster(self) -> None:
        """A plain URL that names a cluster node would fail later, key by key, with MOVED."""
        info = await self.r.info("cluster")
        if int(info.get("cluster_enabled", 0)):
            raise StoreUnavailable(
                f"Redis at {self.display_url} is a Redis Cluster node: use "
                "redis+cluster:// (or rediss+cluster://) with the same address"
            )

    @translate
    async def ping(self) -> None:
        """Round trip to the server; raises StoreUnavailable when it is not there."""
        try:
            await self.r.ping()
        except rexc.AuthenticationError as e:
            raise StoreUnavailable(
                f"Redis at {self.display_url} refused the credentials: {e}"
            ) from None
        except rexc.ResponseError as e:
            if "NOAUTH" in str(e) or "WRONGPASS" in str(e):
                raise StoreUnavailable(
                    f"Redis at {self.display_url} needs a password: {reason(e)}"
                ) from None
            raise
