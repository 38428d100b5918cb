"""Leader election with a coordination.k8s.io/v1 Lease: of N replicas, one reconciles, the others wait.

Why not kopf peering: peering needs its own CRDs and cluster-wide write access to them, and kopf's peering makes
the others *pause* rather than giving a clean hand-over. A Lease is the Kubernetes-native mechanism (the same one
kube-controller-manager uses). A leader that cannot renew within the lease duration stops acting and exits, so
its Deployment restarts it as a standby; two replicas never act at once for longer than one renew interval.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable

from finetune_operator.services.kube import ApiError, Body, Kube

logger = logging.getLogger(__name__)


class LeadershipLostError(Exception):
    """This replica is no longer the leader (lease taken over or not renewable)."""


def _micro(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        duration: float,
        renew: float,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.duration = duration
        self.renew = renew
        self.clock = clock
        self._lease: Body | None = None

    def _spec(self, *, transitions: int, acquire: str | None = None) -> Body:
        now = _micro(self.clock())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.duration)),
            "acquireTime": acquire or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    async def try_acquire(self) -> bool:
        lease = await self.kube.get("Lease", namespace=self.namespace, name=self.name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": self._spec(transitions=0),
            }
            try:
                self._lease = await self.kube.request(
                    "POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body=body
                )
            except ApiError as e:
                if e.status == 409:
                    return False
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        expired = renewed is None or (self.clock() - renewed).total_seconds() > float(
            spec.get("leaseDurationSeconds") or self.duration
        )
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if holder == self.identity else 1)
        lease["spec"] = self._spec(transitions=transitions)
        try:
            self._lease = await self.kube.replace(lease)
        except ApiError as e:
            if e.status == 409:
                return False
            raise
        logger.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)
        return True

    async def acquire(self) -> None:
        """Wait until this replica holds the lease."""
        announced = False
        while True:
            try:
                if await self.try_acquire():
                    return
            except ApiError as e:
                logger.warning("lease %s/%s: %s", self.namespace, self.name, e)
            if not announced:
                logger.info("standing by: lease %s/%s is held by another replica", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.renew)

    async def hold(self) -> None:
        """Renew until leadership is lost; raises LeadershipLostError (never returns normally)."""
        last_ok = self.clock()
        while True:
            await asyncio.sleep(self.renew)
            lease = self._lease
            assert lease is not None
            spec = lease.get("spec") or {}
            lease["spec"] = self._spec(
                transitions=int(spec.get("leaseTransitions") or 0), acquire=spec.get("acquireTime")
            )
            try:
                self._lease = await self.kube.replace(lease)
                last_ok = self.clock()
                continue
            except ApiError as e:
                if e.status == 409:
                    current = await self.kube.get("Lease", namespace=self.namespace, name=self.name)
                    holder = ((current or {}).get("spec") or {}).get("holderIdentity")
                    if holder != self.identity:
                        raise LeadershipLostError(f"lease taken over by {holder!r}") from e
                    self._lease = current
                    continue
                logger.warning("could not renew lease: %s", e)
            if (self.clock() - last_ok).total_seconds() > self.duration:
                raise LeadershipLostError(f"lease not renewed for {self.duration:.0f}s")

    async def release(self) -> None:
        """Hand over at once on graceful shutdown (the standby need not wait for expiry)."""
        lease = self._lease
        if lease is None:
            return
        spec = dict(lease.get("spec") or {})
        if spec.get("holderIdentity") != self.identity:
            return
        spec["holderIdentity"] = None
        spec["leaseDurationSeconds"] = 1
        lease["spec"] = spec
        try:
            await self.kube.replace(lease)
        except ApiError as e:
            logger.warning("could not release lease: %s", e)
        self._lease = None
