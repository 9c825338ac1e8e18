"""How the ingress's handle picks a model replica: among those whose model has loaded, when there are any.

A model replica is up (and in Serve's routing) as soon as it is constructed, while its weights still load in the
background (serving/model_server.py). Routed to, it would answer 503 `model_loading` at once, and with the fewest
requests in flight it would be the one the default power-of-two-choices router picks. So each replica reports
`{"loading": ..., "failed": ...}` through Serve's routing stats, and this router picks two random replicas among the
loaded, healthy ones, the less busy of which gets the request; only when there is none (the endpoint is starting,
or every load failed) does it pick among all, which then answer at once with the reason.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

ROUTER_CLASS = "serving.routing.LoadedReplicasFirst"
# How often Serve's controller asks each model replica for its routing stats: a replica gets traffic about this long
# after its model has loaded.
ROUTING_STATS_PERIOD_S = 1.0


def routable(candidates: list[RunningReplica]) -> list[RunningReplica]:
    """The replicas whose model has loaded (a replica yet to report counts as loading), or all when none has."""
    loaded = [r for r in candidates if r.routing_stats.get("loading") is False and not r.routing_stats.get("failed")]
    return loaded or candidates


class LoadedReplicasFirst(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        pool = routable(candidate_replicas)
        return [random.sample(pool, min(2, len(pool)))]
