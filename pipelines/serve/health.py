"""What ``/healthz`` adds to pinging the deployments: Serve's own view of them.

A ping reaches any live replica, so with one of two model replicas dead it still succeeds while requests on the
dead one fail and Serve starts a replacement. Serve marks such a deployment UNHEALTHY as soon as a health check
finds the actor gone (every ``health_check_period_s``, 2 s in our configs), and HEALTHY again once the replacement
runs; ``/healthz`` reports that window as degraded.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("dynrefer.serve")

#: Deployment statuses that mean replicas are missing (not merely scaling or updating).
DEGRADED = frozenset({"UNHEALTHY", "DEPLOY_FAILED"})


def _name(value: Any) -> str:
    """An enum's value or a plain string, as Serve's status objects hold either by version."""
    return str(getattr(value, "value", value))


def degraded_deployments(app: Any) -> dict[str, dict[str, Any]]:
    """The deployments of one application's Serve status that have lost replicas: status, message and replica
    counts by state."""
    return {name: {"status": _name(d.status), "message": d.message,
                   "replicas": {_name(s): n for s, n in d.replica_states.items()}}
            for name, d in app.deployments.items() if _name(d.status) in DEGRADED}


async def deployment_health(timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """:func:`degraded_deployments` of the application this replica belongs to; {} when all are whole, or when
    the controller does not answer in time (the pings already showed that the deployments answer)."""
    from ray import serve

    try:
        app_name = serve.get_replica_context().app_name
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), timeout_s)
    except Exception as e:  # noqa: BLE001 - no answer from the controller is no evidence against the replicas
        log.warning("health check: no Serve status (%s)", e)
        return {}
    app = status.applications.get(app_name)
    return {} if app is None else degraded_deployments(app)
