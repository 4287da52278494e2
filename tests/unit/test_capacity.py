"""Capacity = live nodes + what the autoscaler may add (raygpt/train/capacity.py).

The reading of a real autoscaling cluster is covered end to end in
tests/e2e/test_autoscaling.py; here the arithmetic and the decisions, on the repository's
own cluster YAMLs and small made-up clusters."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raygpt.errors import UserError
from raygpt.train.capacity import Capacity, Node, ensure_capacity, gpus_possible, types_from_yaml

REPO = Path(__file__).resolve().parents[2]
HEAD = Node("head", {"CPU": 2.0, "memory": 1e9, "node:__internal_head__": 1.0}, None)
FAKE = {"cluster_name": "t", "max_workers": 4, "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 2}, "max_workers": 0},
            "gpu_worker": {"resources": {"CPU": 1, "fake_gpu": 1}, "min_workers": 0, "max_workers": 2}}}
PER = {"CPU": 1.0, "fake_gpu": 1.0}


def cap(*nodes, cfg=FAKE) -> Capacity:
    types, limit = types_from_yaml(cfg)
    return Capacity(list(nodes), types, limit, source="test")


def gpu_node(i: int) -> Node:
    return Node(f"w{i}", {"CPU": 1.0, "fake_gpu": 1.0, "memory": 1e9}, "gpu_worker")


def test_head_only_cluster_places_nothing_now_but_two_eventually():
    c = cap(HEAD)
    assert c.autoscaling
    assert c.placeable_now(PER) == 0
    assert c.placeable_eventually(PER) == 2
    assert c.placeable_eventually({"CPU": 1.0}) == 2 + 2  # the head's CPUs count too


def test_nodes_up_count_against_the_type_limit():
    c = cap(HEAD, gpu_node(1))
    assert c.placeable_now(PER) == 1
    assert c.placeable_eventually(PER) == 2
    c2 = cap(HEAD, gpu_node(1), gpu_node(2))
    assert c2.placeable_eventually(PER) == 2


def test_cluster_wide_cap_limits_additions():
    cfg = {**FAKE, "max_workers": 1}
    assert cap(HEAD, cfg=cfg).placeable_eventually(PER) == 1


def test_never_fits_names_the_node_type_and_its_limit_and_requests_nothing():
    c = cap(HEAD)
    asked: list = []
    with pytest.raises(UserError) as e:
        ensure_capacity("run.num_workers", 3, 3, PER, timeout_s=5, read=lambda: c, log=lambda m: None,
                        request=asked.append)
    msg = str(e.value)
    assert "gpu_worker" in msg and "max_workers 2" in msg and "\n" not in msg
    # A refused run must leave no demand behind: the autoscaler would add nodes for it.
    assert asked == []


def test_fixed_cluster_refuses_what_is_not_there():
    c = Capacity([HEAD])
    assert not c.autoscaling
    with pytest.raises(UserError, match="no autoscaler"):
        ensure_capacity("run.num_workers", 4, 4, {"CPU": 1.0}, timeout_s=5, read=lambda: c, log=lambda m: None)
    assert ensure_capacity("run.num_workers", 2, 2, {"CPU": 1.0}, timeout_s=5, read=lambda: c,
                           log=lambda m: None) is c


def test_waits_until_the_autoscaler_brings_the_minimum():
    states = iter([cap(HEAD), cap(HEAD), cap(HEAD, gpu_node(1)), cap(HEAD, gpu_node(1), gpu_node(2))])
    lines: list[str] = []
    got = ensure_capacity("run.num_workers", 2, 2, PER, timeout_s=60, read=lambda: next(states),
                          log=lines.append, poll_s=0, request=lambda b: None)
    assert got.placeable_now(PER) == 2
    assert "waiting for the autoscaler" in lines[0] and "gpu_worker" in lines[0]
    assert "placeable after" in lines[-1]


def test_elastic_starts_with_the_minimum():
    states = iter([cap(HEAD), cap(HEAD, gpu_node(1))])
    asked: list = []
    got = ensure_capacity("run.num_workers", 1, 2, PER, timeout_s=60, read=lambda: next(states),
                          log=lambda m: None, poll_s=0, request=asked.append)
    assert asked == [[PER, PER]]  # the autoscaler is asked for the maximum
    assert got.placeable_now(PER) == 1


def test_gives_up_after_the_timeout_with_a_one_line_error_and_withdraws():
    asked: list = []
    with pytest.raises(UserError) as e:
        ensure_capacity("run.num_workers", 2, 2, PER, timeout_s=0.05, read=lambda: cap(HEAD),
                        log=lambda m: None, poll_s=0.01, request=asked.append)
    assert "run.placement_timeout_s" in str(e.value) and "\n" not in str(e.value)
    assert asked == [[PER, PER], []]


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_repository_gpu_clusters_can_scale_gpu_workers_from_zero(name):
    cfg = yaml.safe_load((REPO / "cluster" / name).read_text())
    c = cap(Node("head", {"CPU": 8.0}, None), cfg=cfg)
    per = {"CPU": 8.0, "GPU": 1.0}
    assert gpus_possible(c)
    assert c.placeable_now(per) == 0
    # two node types of 2 nodes x 8 GPUs, within the cluster-wide cap of 4 worker nodes
    assert c.placeable_eventually(per) == 4 * 8
    assert c.eventual_totals()["GPU"] == 4 * 8
