"""A scale model of goodput: what fraction of a cluster's time becomes training progress,
given how often it fails and what a save and a restart cost (pure arithmetic).

First-order model (Young 1974, Daly 2006), with failures independent across nodes:
- the cluster fails every M = node_mtbf_s / nodes seconds;
- a blocking save of C seconds every tau seconds of training costs C / tau;
- each failure costs R (detection + restart + restore) plus, on average, the half
  interval of work since the last save: (tau / 2 + R) / M per second of run;
- Young's interval tau* = sqrt(2 C M) minimises the sum (Daly's refinement subtracts C).

goodput ~= 1 - C / tau - (tau / 2 + R) / M, floored at 0. Steady state only: start-up,
compile and evals are not in it (the ledger, raygpt.train.goodput, measures those).

Replica mode (run.fault_tolerance: replica, docs/replica_recovery.md): a failure re-runs
nothing and restarts nothing; every replica stalls until the failure is seen (S), then
the lost replica's share of the cluster, 1 / replicas, is missing until its replacement
has joined (J): goodput ~= 1 - C / tau - (S + J / replicas) / M. Saves then only guard
against losing every replica at once; tau defaults to Young's interval all the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Llama 3 (16,384 H100, 8 per node): 419 unexpected interruptions in 54 days.
LLAMA3_NODE_MTBF_S = 54 * 86400 * (16384 / 8) / 419


@dataclass(frozen=True)
class Plan:
    gpus: int
    cluster_mtbf_s: float
    interval_s: float        # the save interval the figures are for
    goodput: float           # predicted fraction of wall time that is training progress
    save_overhead: float     # C / tau
    failure_overhead: float  # (tau / 2 + R) / M


def young_interval(save_s: float, cluster_mtbf_s: float) -> float:
    return math.sqrt(2 * save_s * cluster_mtbf_s)


def _mtbf_and_interval(gpus, node_mtbf_s, save_s, gpus_per_node, interval_s) -> tuple[float, float]:
    """The cluster's MTBF (failures independent across nodes) and the save interval:
    the given one, else Young's."""
    m = node_mtbf_s / max(1, math.ceil(gpus / gpus_per_node))
    return m, interval_s if interval_s is not None else max(young_interval(save_s, m), 1e-9)


def predict(gpus: int, node_mtbf_s: float, save_s: float, restart_s: float, gpus_per_node: int = 8,
            interval_s: float | None = None) -> Plan:
    """Goodput of `gpus` GPUs; interval_s None: Young's best interval."""
    if min(gpus, gpus_per_node) < 1 or node_mtbf_s <= 0 or save_s < 0 or restart_s < 0:
        raise ValueError("gpus and gpus_per_node >= 1, node_mtbf_s > 0, save_s and restart_s >= 0")
    m, tau = _mtbf_and_interval(gpus, node_mtbf_s, save_s, gpus_per_node, interval_s)
    save_ovh = save_s / tau
    fail_ovh = (tau / 2 + restart_s) / m
    return Plan(gpus, m, tau, max(0.0, 1.0 - save_ovh - fail_ovh), save_ovh, fail_ovh)


def predict_replica(gpus: int, node_mtbf_s: float, save_s: float, stall_s: float, rejoin_s: float,
                    gpus_per_replica: int, gpus_per_node: int = 8, interval_s: float | None = None) -> Plan:
    """Goodput of `gpus` GPUs in replica groups of `gpus_per_replica`: a failure costs every
    replica `stall_s` and its own replica `rejoin_s`. One replica: restart mode."""
    if min(gpus, gpus_per_node, gpus_per_replica) < 1 or node_mtbf_s <= 0 or min(save_s, stall_s, rejoin_s) < 0:
        raise ValueError("gpus, gpus_per_node and gpus_per_replica >= 1, node_mtbf_s > 0, costs >= 0")
    replicas = gpus // gpus_per_replica
    if replicas < 2:  # no peer to heal from: the group restarts from its checkpoint
        return predict(gpus, node_mtbf_s, save_s, stall_s + rejoin_s, gpus_per_node, interval_s)
    m, tau = _mtbf_and_interval(gpus, node_mtbf_s, save_s, gpus_per_node, interval_s)
    save_ovh = save_s / tau
    fail_ovh = (stall_s + rejoin_s / replicas) / m
    return Plan(gpus, m, tau, max(0.0, 1.0 - save_ovh - fail_ovh), save_ovh, fail_ovh)
