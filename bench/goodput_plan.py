"""Predicted goodput and the best checkpoint interval at 8 .. 16,384 GPUs
(raygpt.train.goodput_model: Young/Daly, failures independent across nodes).

    python bench/goodput_plan.py                          # the defaults below
    python bench/goodput_plan.py --save-s 10 --restart-s 120 --node-mtbf-days 264

Defaults: a node fails every ~264 days (Llama 3's 419 interruptions in 54 days on 2,048
8-GPU nodes), a blocking save costs 10 s and a restart (detection, new workers, compile,
restore) 120 s. Prints one row per size: cluster MTBF, Young's interval, goodput, and
the goodput at a fixed interval for comparison, and the goodput in replica mode
(run.fault_tolerance: replica): a failure stalls every replica for --stall-s and leaves
its replica group (--gpus-per-replica GPUs) out for --rejoin-s while a replacement starts,
compiles and heals from a peer.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from raygpt.train.goodput_model import LLAMA3_NODE_MTBF_S, predict, predict_replica  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--node-mtbf-days", type=float, default=LLAMA3_NODE_MTBF_S / 86400)
    ap.add_argument("--save-s", type=float, default=10.0, help="seconds a save blocks training")
    ap.add_argument("--restart-s", type=float, default=120.0, help="detection + restart + restore, seconds")
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--fixed-interval-s", type=float, default=3600.0, help="a fixed interval to compare with")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 1024, 16384])
    ap.add_argument("--stall-s", type=float, default=10.0, help="replica mode: every replica's stall per failure")
    ap.add_argument("--rejoin-s", type=float, default=120.0,
                    help="replica mode: seconds the failed replica group is out (new workers, compile, heal)")
    ap.add_argument("--gpus-per-replica", type=int, default=8, help="replica mode: GPUs per replica group")
    a = ap.parse_args(argv)
    mtbf = a.node_mtbf_days * 86400
    print(f"inputs: node MTBF {a.node_mtbf_days:.0f} days, save {a.save_s:g} s, restart {a.restart_s:g} s, "
          f"{a.gpus_per_node} GPUs/node; replica mode: stall {a.stall_s:g} s, rejoin {a.rejoin_s:g} s, "
          f"{a.gpus_per_replica} GPUs/replica")
    print(f"{'GPUs':>7} {'cluster MTBF':>13} {'best interval':>14} {'goodput':>8} "
          f"{'at ' + format(a.fixed_interval_s, 'g') + ' s':>10} {'replica':>8}")
    for g in a.gpus:
        best = predict(g, mtbf, a.save_s, a.restart_s, a.gpus_per_node)
        fixed = predict(g, mtbf, a.save_s, a.restart_s, a.gpus_per_node, interval_s=a.fixed_interval_s)
        rep = predict_replica(g, mtbf, a.save_s, a.stall_s, a.rejoin_s, a.gpus_per_replica, a.gpus_per_node)
        print(f"{g:>7} {best.cluster_mtbf_s / 3600:>11.1f} h {best.interval_s / 60:>12.1f} m "
              f"{100 * best.goodput:>7.2f}% {100 * fixed.goodput:>9.2f}% {100 * rep.goodput:>7.2f}%")


if __name__ == "__main__":
    main()
