"""Ray plumbing for the Ray executor: connecting, actor pools that replace dead actors, gang scheduling."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tpdm_rl.core.console import waiting
from tpdm_rl.executors.base import FatalRoleError
from tpdm_rl.training.resources import describe, shortfall, total

CONNECT_TIMEOUT_S = 10.0


def init_ray(address: str = "", num_cpus: int | None = None) -> bool:
    """Connect to ``address`` / RAY_ADDRESS, or start a local instance sized to the machine.

    Returns True when this process started Ray (and so should shut it down). An address that does
    not answer fails within ``CONNECT_TIMEOUT_S`` with one line instead of retrying for minutes.
    """
    import ray

    if ray.is_initialized():
        return False
    addr = address or os.environ.get("RAY_ADDRESS", "")
    if addr:  # a job's own runtime_env (working_dir, ...) is inherited as it is
        if addr not in ("auto",) and not addr.startswith("ray://"):
            _check_reachable(addr)
        try:
            with waiting(f"connecting to the Ray cluster at {addr}"):
                ray.init(address=addr, log_to_driver=False)
        except ConnectionError as exc:  # Ray's own text talks of an "instance" and is read as a write error
            where = "--address auto" if addr == "auto" else f"Ray address {addr!r}"
            raise RayAddressError(f"{where}: no running Ray cluster was found ({str(exc).splitlines()[0]}); start "
                                  "one with `ray start --head`, pass its HOST:PORT, or leave --address out to start "
                                  "a local instance") from None
        return False
    # address="local": a new instance, never one recorded in /tmp/ray/ray_current_cluster by another user
    with waiting("starting a local Ray instance"):
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    return True


class RayAddressError(FatalRoleError):
    """``--address`` is malformed or does not answer (nothing ran, so nothing was checkpointed)."""


def _check_reachable(addr: str) -> None:
    """A TCP connect to the GCS address (host:port), so a wrong address fails fast."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(f"Ray address {addr!r} is not HOST:PORT (port 1-65535), 'auto' or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise RayAddressError(f"cannot reach the Ray cluster at {addr!r} within {CONNECT_TIMEOUT_S:g}s: "
                              f"{exc.strerror or exc}; expected the GCS address of a running cluster "
                              "(ray start --head prints it)") from None


def actor_env() -> dict:
    """Environment variables every actor gets (merged into the job's runtime_env)."""
    # OMP_WAIT_POLICY must be set before torch loads in the actor process: the thread policy (docs/threads.md)
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    for k in ("HF_HUB_OFFLINE", "HF_HOME", "DS_ACCELERATOR"):
        if k in os.environ:
            env[k] = os.environ[k]
    return {"env_vars": env}


def actor_error_types() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    return (RayActorError, ActorDiedError, ActorUnavailableError)


def creation_error(exc: BaseException) -> str:
    """The first meaningful line of an actor-creation failure (e.g. a RewardError)."""
    text = str(exc)
    for line in text.splitlines():
        for marker in ("RewardError: ", "BackboneError: ", "CheckpointError: ", "PromptFileError: "):
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return text.strip().splitlines()[-1] if text.strip() else type(exc).__name__


class Gang:
    """One placement group (PACK) for every role actor, reserved before any actor starts.

    Inside a Ray Tune trial the trial's own placement group already holds the bundles and captures
    child actors, so no second group is made. On a local instance a layout that cannot fit is refused
    at once; on a cluster the group may wait ``timeout_s`` for the autoscaler, then fails with one line
    naming the missing resources.
    """

    def __init__(self, bundles: list[tuple[str, dict[str, float]]], timeout_s: float, local: bool) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.placement_group import placement_group

        self.roles = [r for r, _ in bundles]
        self.index: list[int | None] = []
        real = []
        for _, b in bundles:
            self.index.append(len(real) if any(v > 0 for v in b.values()) else None)
            if any(v > 0 for v in b.values()):
                real.append(b)
        self.pg = None
        if get_current_placement_group() is not None or not real:
            return
        need, have = total(real), ray.cluster_resources()
        short = shortfall(need, have)
        if short and local:
            raise FatalRoleError(f"the actor pools need {describe(short)} on this local Ray instance; shrink "
                                 "distributed.* (num_workers, num_cpus, num_ranks) or pass --address of a cluster")
        if short:
            print(f"tpdm-rl: warning: the actor pools need {describe(short)}; waiting up to "
                  f"distributed.startup_timeout_s={timeout_s:g}s for the cluster to grow", file=sys.stderr)
        self.pg = placement_group(real, strategy="PACK")
        try:
            amounts = ", ".join(f"{v:g} {k}" for k, v in need.items())
            with waiting(f"reserving {len(real)} actor bundles ({amounts})"):
                ray.get(self.pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
            raise FatalRoleError(f"the actor pools ({len(real)} bundles, {describe(shortfall(need, {}))}) were not "
                                 f"placed within distributed.startup_timeout_s={timeout_s:g}s; the cluster has "
                                 f"{ray.cluster_resources()}") from None

    def options(self, slot: int) -> dict:
        """``.options(...)`` for the actor in bundle list position ``slot``."""
        if self.pg is None or self.index[slot] is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=self.index[slot])}

    def remove(self) -> None:
        if self.pg is not None:
            import ray

            ray.util.remove_placement_group(self.pg)
            self.pg = None


@dataclass
class ActorPool:
    """A fixed number of actor slots; a dead actor is replaced in its slot (up to ``max_restarts``)."""
    name: str
    factory: Callable[[int], object]  # slot -> actor handle
    size: int
    max_restarts: int
    actors: list = field(default_factory=list)
    restarts: list = field(default_factory=list)

    def start(self) -> None:
        self.actors = [self.factory(i) for i in range(self.size)]
        self.restarts = [0] * self.size

    def replace(self, slot: int, cause: BaseException) -> None:
        import ray

        self.restarts[slot] += 1
        if self.restarts[slot] > self.max_restarts:
            raise FatalRoleError(f"{self.name} worker {slot} died {self.restarts[slot]} times (limit "
                                 f"distributed.max_actor_restarts={self.max_restarts}): {creation_error(cause)}")
        try:
            ray.kill(self.actors[slot], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[slot] = self.factory(slot)

    @property
    def total_restarts(self) -> int:
        return sum(self.restarts)

    def kill_all(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
