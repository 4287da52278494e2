"""Distillation benchmark: a small student distilled from a bigger teacher vs the same
student trained from scratch for the same steps (Shakespeare, char tokenizer, Ray Train).

    python bench/distill.py                              # CPU defaults (a few minutes)
    python bench/distill.py --teacher-steps 2000 --student-steps 1000 --use-gpu

1. teacher: the shakespeare-char-cpu shape (4 layers x 128), --teacher-steps steps;
2. student (--student-set, default 2 layers x 64) distilled from it: loss =
   alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, --student-steps steps;
3. the same student from scratch: plain CE, same steps, seed, data and optimizer.
All three are exported and evaluated on the same held-out windows (raygpt eval). Prints
params and val losses, and the fraction of the scratch-to-teacher gap that
distillation closed. Numbers, not pass/fail.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default=None, help="reuse this exported teacher (skip step 1)")
    ap.add_argument("--teacher-preset", default="shakespeare-char-cpu")
    ap.add_argument("--teacher-steps", type=int, default=1000)
    ap.add_argument("--student-steps", type=int, default=500)
    ap.add_argument("--student-set", action="append",
                    default=None, help="student shape/optim overrides (default: 2 layers x 64)")
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--eval-steps", type=int, default=50)
    ap.add_argument("--num-workers", default="1")
    ap.add_argument("--use-gpu", action="store_true")
    ap.add_argument("--storage", default=None)
    ap.add_argument("--json", dest="json_out", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    student_set = a.student_set or ["model.n_layer=2", "model.n_embd=64", "model.n_head=4"]

    import ray

    from raygpt.data.prepare import ensure_data
    from raygpt.config import DataConfig
    from raygpt.lifecycle.distill import build_distill_config
    from raygpt.lifecycle.eval import evaluate_model
    from raygpt.train.export import export_checkpoint
    from raygpt.train.runconfig import build_run_config
    from raygpt.train.launch import run_training

    t_all = time.perf_counter()
    storage = a.storage or tempfile.mkdtemp(prefix="raygpt-distill-")
    data = str(ensure_data(DataConfig()))  # bundled Shakespeare, char tokenizer
    if not ray.is_initialized():  # one Ray for the three runs
        addr = os.environ.get("RAY_ADDRESS")
        if addr in (None, "", "local"):
            os.environ.pop("RAY_ADDRESS", None)  # embedded: workers get this machine's cores
            ray.init(address="local", log_to_driver=True)
        else:
            ray.init(address=addr, log_to_driver=True)
    gpu = True if a.use_gpu else None
    common = [f"data.path={data}", "checkpoint.every=0", "train.log_every=100"]

    def run(cfg, name):
        t0 = time.perf_counter()
        s = run_training(cfg, progress=False)
        out = export_checkpoint(s["checkpoint"] or s["run_dir"], os.path.join(storage, f"{name}-model"))
        return str(out), time.perf_counter() - t0

    if a.teacher:
        teacher, t_teacher = str(os.path.abspath(a.teacher)), 0.0
        from raygpt.model.io import read_model_config

        a.teacher_steps = read_model_config(teacher).get("step")
    else:
        teacher_cfg = build_run_config(None, a.teacher_preset, common + [f"train.max_steps={a.teacher_steps}"],
                                       num_workers=a.num_workers, use_gpu=gpu, storage=storage, name="teacher")
        teacher, t_teacher = run(teacher_cfg, "teacher")
        print(f"[distill] teacher trained in {t_teacher:.0f}s", flush=True)

    sset = common + student_set + [f"train.max_steps={a.student_steps}",
                                   f"optim.decay_steps={a.student_steps}"]
    dcfg = build_distill_config(teacher, None, a.teacher_preset, sset, temperature=a.temperature,
                                alpha=a.alpha, num_workers=a.num_workers, use_gpu=gpu,
                                storage=storage, name="student-distilled")
    distilled, t_dist = run(dcfg, "student-distilled")
    print(f"[distill] distilled student trained in {t_dist:.0f}s", flush=True)

    # The same student, same everything, without the teacher.
    scfg = dcfg.to_dict()
    scfg["distill"]["teacher"] = None
    scfg["run"]["name"] = "student-scratch"
    from raygpt.config import validate

    scratch, t_scratch = run(validate(scfg), "student-scratch")
    print(f"[distill] scratch student trained in {t_scratch:.0f}s", flush=True)

    block = dcfg.model.block_size
    ev = {name: evaluate_model(d, data, steps=a.eval_steps, block_size=block, samples=0)
          for name, d in (("teacher", teacher), ("student_distilled", distilled),
                          ("student_scratch", scratch))}
    gap = ev["student_scratch"]["val_loss"] - ev["teacher"]["val_loss"]
    closed = ((ev["student_scratch"]["val_loss"] - ev["student_distilled"]["val_loss"]) / gap
              if gap > 0 else None)
    res = {
        "data": data, "eval": {"steps": a.eval_steps, "batch": 16, "block_size": block},
        "teacher": {"params": ev["teacher"]["params"], "val_loss": ev["teacher"]["val_loss"],
                    "steps": a.teacher_steps, "preset": a.teacher_preset, "train_s": round(t_teacher, 1)},
        "student_distilled": {"params": ev["student_distilled"]["params"],
                              "val_loss": ev["student_distilled"]["val_loss"], "steps": a.student_steps,
                              "temperature": a.temperature, "alpha": a.alpha, "train_s": round(t_dist, 1)},
        "student_scratch": {"params": ev["student_scratch"]["params"],
                            "val_loss": ev["student_scratch"]["val_loss"], "steps": a.student_steps,
                            "train_s": round(t_scratch, 1)},
        "student_shape": student_set,
        "gap_closed": closed,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    print(json.dumps(res, indent=1))
    print(f"\nteacher            {res['teacher']['params'] / 1e6:6.3f}M params  val {res['teacher']['val_loss']:.4f}")
    print(f"student distilled  {res['student_distilled']['params'] / 1e6:6.3f}M params  val "
          f"{res['student_distilled']['val_loss']:.4f}")
    print(f"student scratch    {res['student_scratch']['params'] / 1e6:6.3f}M params  val "
          f"{res['student_scratch']['val_loss']:.4f}")
    if closed is not None:
        print(f"distillation closed {100 * closed:.0f}% of the scratch-to-teacher gap "
              f"({a.student_steps} student steps)")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
