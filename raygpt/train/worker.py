"""The Ray Train per-worker function: build -> parallelize -> restore -> loop -> report.

Runs on every worker. Everything that depends on the world size (parallel plan, data
slice, micro batch, accumulation) is derived here at every (re)start, so an elastic
restart at another size continues the same training math.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from raygpt.config import Config, validate
from raygpt.errors import UserError


def _log(rank: int, msg: str) -> None:
    # Not print(): Ray Train patches print into a logger that echoes each line twice.
    if rank == 0:
        sys.stdout.write(f"[raygpt] {msg}\n")
        sys.stdout.flush()


def _quiet_ray_train_reports() -> None:
    """Ray Train logs every report with all its metrics at INFO (a logger named after
    its file); our own step lines carry the same figures."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as _ctx

        logging.getLogger(_ctx.__file__).setLevel(logging.WARNING)
    except Exception:
        pass


def _maybe_crash_in_save(inject: dict, step: int, rank: int, run_dir) -> None:
    """Fault injection for tests and `raygpt chaos`: the process dies after writing its
    shard locally but before reporting it, once per run (a marker file remembers)."""
    at = inject.get("crash_in_save_at")
    if at is None or step != at or rank != inject.get("rank", 0) or run_dir is None:
        return
    marker = Path(run_dir) / ".crash-in-save-injected"
    if marker.exists():
        return
    marker.write_text(str(step))
    sys.stdout.write(f"[raygpt] injected crash during checkpoint save at step {step} (rank {rank})\n")
    sys.stdout.flush()
    os._exit(1)


def _register_worker(run_dir: Path, rank: int, world: int) -> None:
    """<run_dir>/.workers/rank<r>.json: where each rank runs (used by raygpt chaos)."""
    import json

    import ray

    d = run_dir / ".workers"
    d.mkdir(parents=True, exist_ok=True)
    for stale in d.glob("rank*.json"):
        if rank == 0 and int(stale.stem[4:]) >= world:
            stale.unlink(missing_ok=True)
    info = {"rank": rank, "world_size": world, "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(), "time": time.time()}
    tmp = d / f".rank{rank}.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, d / f"rank{rank}.json")


class _SigtermFlag:
    """SIGTERM (spot reclaim, node drain) sets a flag; the loop agrees on it across ranks
    at the next log step and writes a checkpoint before the process goes."""

    def __init__(self):
        import signal
        import threading

        self.set = False
        if threading.current_thread() is threading.main_thread():
            try:
                signal.signal(signal.SIGTERM, self._handler)
            except ValueError:
                pass

    def _handler(self, signum, frame):
        self.set = True


def _pick_restore(ray_ckpt, run_dir, world: int):
    """The checkpoint to resume from: Ray's latest registered one, or a newer one in the
    run directory whose every shard is on disk. Ray registers a reported checkpoint only
    when its controller next polls the workers (every 2 s), so a worker that dies right
    after a save would otherwise lose it. Rank 0 decides; all ranks load the same one."""
    import torch.distributed as dist
    from ray.train import Checkpoint

    from raygpt.train import checkpoint as ckpt_lib

    choice = [None]
    if dist.get_rank() == 0:
        best_path, best_step = None, -1
        if ray_ckpt is not None:
            try:
                with ray_ckpt.as_directory() as d:
                    best_step = ckpt_lib.read_state(d)["step"]
                best_path = ("ray", ray_ckpt.path)
            except Exception:
                best_path, best_step = ("ray", ray_ckpt.path), -1
        if run_dir is not None:
            local = ckpt_lib.latest_checkpoint(run_dir)
            if local is not None and ckpt_lib.read_state(local)["step"] > best_step:
                best_path = ("dir", str(local))
        choice = [best_path]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    kind, path = choice[0]
    if kind == "ray":
        return ray_ckpt if ray_ckpt is not None else Checkpoint(path)
    return Checkpoint.from_directory(path)


def _any_rank(flag: bool, device) -> bool:
    """True if any rank has the flag (one tiny all-reduce)."""
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _threads(cfg: Config) -> int:
    n = int(cfg.run.cpus_per_worker or 1)
    return max(1, n)


def _amp_dtype(cfg: Config, device: torch.device):
    if cfg.train.dtype == "float32":
        return None
    if cfg.train.dtype == "bfloat16" or device.type == "cuda":
        return torch.bfloat16
    return None


def build_model(cfg: Config, vocab_size: int):
    from raygpt.model.gpt import GPT, GPTConfig

    gcfg = GPTConfig.from_model_config(cfg.model, vocab_size)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = GPT(gcfg)
    if cfg.train.init_from:
        from raygpt.model.io import load_model_dir

        src, _ = load_model_dir(cfg.train.init_from)
        model.load_state_dict(src.state_dict())
    apply_freeze(model, cfg.train.freeze)
    return model, gcfg


def apply_freeze(model, freeze: list[str]) -> list[str]:
    """train.freeze: "embeddings" and/or "blocks:N". Returns frozen parameter names."""
    frozen = []
    for item in freeze:
        if item == "embeddings":
            mods = [model.wte, model.wpe]
        elif item.startswith("blocks:"):
            try:
                n = int(item.split(":", 1)[1])
            except ValueError:
                raise UserError(f"train.freeze entry {item!r}: expected blocks:N") from None
            if not 0 < n <= len(model.blocks):
                raise UserError(f"train.freeze={item!r}: the model has {len(model.blocks)} blocks")
            mods = list(model.blocks.values())[:n]
        else:
            raise UserError(f"train.freeze entry {item!r}: expected 'embeddings' or 'blocks:N'")
        for m in mods:
            for name, p in m.named_parameters():
                p.requires_grad_(False)
                frozen.append(name)
    return frozen


def train_func(loop_config: dict) -> None:
    """Entry point given to TorchTrainer. loop_config: {"config": Config dict,
    "run_dir": local path for metrics/summary (or None), "data_dir": prepared data}."""
    import ray.train
    import torch.distributed as dist

    from raygpt.data.loader import BatchLoader
    from raygpt.data.loader import worker_data_dir
    from raygpt.data.prepare import read_meta
    from raygpt.parallel.apply import parallelize
    from raygpt.parallel.plan import resolve_plan
    from raygpt.train import checkpoint as ckpt_lib
    from raygpt.train.loop import (batch_geometry, build_optimizer, evaluate, lr_at, pp_train_step,
                                   train_step)
    from raygpt.train.metrics import RunWriter, device_peak_flops, plot_loss, write_json_atomic

    cfg = validate(loop_config["config"])
    _quiet_ray_train_reports()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(_threads(cfg))

    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = _amp_dtype(cfg, device)

    # Data: a shared path from the driver, or the bundled corpus prepared on this node.
    data_dir = worker_data_dir(cfg.data, loop_config.get("data_dir"))
    meta = read_meta(data_dir)
    tokenizer_path = data_dir / "tokenizer.json"

    model, gcfg = build_model(cfg, meta["vocab_size"])
    n_params = model.num_params()
    flops_per_token = model.flops_per_token()
    dev_mem = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    plan = resolve_plan(cfg.parallel, world, n_heads=gcfg.n_head, n_params=n_params,
                        device_memory=dev_mem, on_gpu=device.type == "cuda")
    mesh = plan.build_mesh(device.type)
    dp_rank = plan.dp_rank(rank)
    per_rank, micro, accum = batch_geometry(cfg.train.global_batch, plan.dp, cfg.train.micro_batch)

    mp = amp_dtype if plan.shard > 1 else None
    pipe = None
    if plan.pp > 1:
        from raygpt.parallel.pipeline import Pipeline
        from raygpt.train.loop import pp_microbatches

        n_mb = pp_microbatches(cfg.train.pp_microbatches, per_rank, plan.pp)
        pipe = Pipeline(model, plan, mesh, cfg.parallel, device, n_mb, mp_dtype=mp)
        model = pipe.parts  # checkpoints go over the list of stage modules
        optimizer = [build_optimizer(p, cfg.optim, device.type) for p in pipe.parts]
        micro, accum = per_rank // n_mb, n_mb
    else:
        model = parallelize(model, plan, mesh, cfg.parallel, device, mp_dtype=mp)
        optimizer = build_optimizer(model, cfg.optim, device.type)
    if mp is not None:
        amp_dtype = None  # FSDP's mixed-precision policy casts; no autocast on top
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    teacher = None
    if cfg.distill.teacher and pipe is None:
        # The teacher runs beside the student on every worker, inference only, unwrapped.
        from raygpt.model.io import load_model_dir

        teacher, _ = load_model_dir(cfg.distill.teacher, device=device)
        teacher.requires_grad_(False)
        if teacher.config.vocab_size < gcfg.vocab_size and teacher.config.vocab_size < meta["vocab_size"]:
            raise UserError(f"distill.teacher {cfg.distill.teacher}: vocabulary {teacher.config.vocab_size} "
                            f"is smaller than the data's {meta['vocab_size']}")
        _log(rank, f"distilling from {cfg.distill.teacher} ({teacher.num_params() / 1e6:.2f}M params, "
                   f"T={cfg.distill.temperature}, alpha={cfg.distill.alpha})")

    # ---------------------------------------------------------------- restore
    start_step, best_val, train_seconds_prev = 0, float("inf"), 0.0
    scan_dir = None if (loop_config.get("inject") or {}).get("run_uri") else loop_config.get("run_dir")
    restored = _pick_restore(ray.train.get_checkpoint(), scan_dir, world)
    if restored is not None:
        with restored.as_directory() as d:
            saved = ckpt_lib.read_state(d)
            ckpt_lib.check_compatible(saved["model"], gcfg.__dict__, d)
            ckpt_lib.load_checkpoint(d, model, optimizer)
        start_step = saved["step"]
        best_val = saved.get("best_val_loss") or float("inf")
        train_seconds_prev = saved.get("train_seconds", 0.0)
        if "rng" in saved and rank == 0:
            torch.manual_seed(saved["rng"])
        old = saved.get("world_size")
        if old != world:
            _log(rank, f"resize: world size {old} -> {world} at step {start_step}: plan "
                       f"{saved.get('plan')} -> {plan.describe()}, accumulation "
                       f"{saved.get('accum')} -> {accum} (global batch {cfg.train.global_batch} kept)")
        _log(rank, f"restored step {start_step} from {restored.path}")

    run_dir = loop_config.get("run_dir")
    inject = loop_config.get("inject") or {}
    writer = RunWriter(run_dir, enabled=(rank == 0 and run_dir is not None))
    if run_dir is not None:
        _register_worker(Path(run_dir), rank, world)
    sigterm = _SigtermFlag()
    writer.event("start", step=start_step, world_size=world, plan=plan.describe(), micro_batch=micro,
                 accum=accum, restored=restored is not None)
    _log(rank, f"model {n_params / 1e6:.2f}M params | plan {plan.describe()} | device {device} | "
               f"global batch {cfg.train.global_batch} = dp {plan.dp} x micro {micro} x accum {accum} | "
               f"steps {start_step}->{cfg.train.max_steps}")

    train_loader = BatchLoader(data_dir, "train", gcfg.block_size, cfg.train.global_batch,
                               cfg.train.seed, dp_rank, plan.dp, sampling=cfg.data.sampling)
    val_loader = BatchLoader(data_dir, "val", gcfg.block_size, cfg.train.global_batch,
                             cfg.train.seed, dp_rank, plan.dp)
    decay = cfg.optim.decay_steps or cfg.train.max_steps
    tokens_per_step = cfg.train.global_batch * gcfg.block_size
    peak = device_peak_flops(device, _threads(cfg)) * world
    async_pg = None
    if cfg.checkpoint.async_save and (device.type == "cuda" or inject.get("async_save_on_cpu")):
        # DCP's async path runs its collectives on a separate gloo group (CPU tensors).
        async_pg = dist.new_group(backend="gloo") if world > 1 else None
        use_async = True
    else:
        use_async = False
    pending_save = None  # (future, local dir, step) of an async save in flight

    def all_mean(t: torch.Tensor) -> float:
        """Mean over ranks; with a pipeline only the last stage's ranks hold a loss."""
        if world > 1:
            t = t.detach().clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= (plan.dp * plan.tp) if pipe is not None else world
        return float(t)

    def trainer_state(step, val_loss):
        return {"step": step, "world_size": world, "plan": plan.describe(), "accum": accum,
                "micro_batch": micro, "best_val_loss": best_val if best_val < float("inf") else None,
                "val_loss": val_loss, "train_seconds": train_seconds_prev + train_time,
                "model": dict(gcfg.__dict__), "config": cfg.to_dict(), "rng": cfg.train.seed + step,
                "data_position": train_loader.position(step)}

    def report_saved(local: Path, step: int, metrics: dict, upload_async: bool):
        from ray.train import CheckpointUploadMode

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=f"checkpoint_{step:07d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC if upload_async
                         else CheckpointUploadMode.SYNC,
                         delete_local_checkpoint_after_upload=True)

    def finish_pending():
        """Wait for an async save started earlier and report it (all ranks, same step)."""
        nonlocal pending_save
        if pending_save is None:
            return
        fut, local, saved_step, metrics, t_start = pending_save
        t0 = time.perf_counter()
        fut.result()
        metrics["checkpoint_blocked_s"] = round(metrics["checkpoint_blocked_s"] + time.perf_counter() - t0, 4)
        pending_save = None
        report_saved(local, saved_step, metrics, upload_async=True)

    def save_and_report(step, metrics, val_loss, final=False):
        """Write this rank's shard, then report it; Ray registers the checkpoint once
        every rank has reported (a half-written save is never the latest).

        On GPU, dcp.async_save stages the state to host memory and writes it in the
        background: training goes on, and the report (a barrier) happens at the next
        save point or the end, when the files are complete."""
        nonlocal pending_save
        finish_pending()
        local = Path(tempfile.mkdtemp(prefix=f"raygpt-ckpt-{step}-"))
        t0 = time.perf_counter()
        fut = ckpt_lib.save_checkpoint(local, model, optimizer, trainer_state(step, val_loss), rank,
                                       tokenizer_path, use_async=use_async and not final,
                                       async_pg=async_pg)
        blocked = time.perf_counter() - t0
        metrics["checkpoint_blocked_s"] = round(blocked, 4)
        writer.event("checkpoint", step=step, blocked_s=round(blocked, 4), asynchronous=fut is not None)
        _maybe_crash_in_save(inject, step, rank, run_dir)
        if fut is not None:
            pending_save = (fut, local, step, metrics, t0)
            return
        report_saved(local, step, metrics, upload_async=False)

    # ---------------------------------------------------------------- loop
    for m in (model if isinstance(model, list) else [model]):
        m.train()
    train_time = 0.0
    window_t, window_steps = 0.0, 0
    loss_acc = torch.zeros((), device=device)
    last_val, last_rec = None, {}
    step = start_step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    while step < cfg.train.max_steps:
        lr = lr_at(step, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps, decay)
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = lr
        t0 = time.perf_counter()
        if pipe is not None:
            x, y = train_loader.get(step)
            loss, gnorm = pp_train_step(pipe, optimizers, x, y, device, cfg.optim.grad_clip)
        else:
            loss, gnorm = train_step(model, optimizer, train_loader.get_micro(step, micro), device,
                                     amp_dtype, cfg.optim.grad_clip, teacher=teacher, distill=cfg.distill)
        step += 1
        loss_acc += loss
        window_steps += 1
        is_log = step % cfg.train.log_every == 0 or step == cfg.train.max_steps
        is_eval = step % cfg.train.eval_every == 0 or step == cfg.train.max_steps
        is_ckpt = (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.train.max_steps
        if is_log or is_eval or is_ckpt:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        train_time += dt
        window_t += dt
        if not (is_log or is_eval or is_ckpt):
            continue

        rec = {"step": step, "lr": lr, "world_size": world}
        if is_log or is_eval:
            rec["loss"] = all_mean(loss_acc / max(1, window_steps))
            rec["grad_norm"] = float(gnorm)
            tps = tokens_per_step * window_steps / max(window_t, 1e-9)
            rec["tokens_per_s"] = tps
            rec["mfu"] = flops_per_token * tps / peak
            rec["step_ms"] = 1000 * window_t / max(1, window_steps)
            if device.type == "cuda":
                rec["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                import resource

                rec["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            loss_acc.zero_()
            window_t, window_steps = 0.0, 0
        if is_eval:
            if pipe is not None:
                vl = torch.stack([pipe.eval_loss(*val_loader.get(k), device)
                                  for k in range(cfg.train.eval_steps)]).mean()
            else:
                vl = evaluate(model, val_loader, cfg.train.eval_steps, micro, device, amp_dtype)
            last_val = all_mean(vl)
            best_val = min(best_val, last_val)
            rec["val_loss"] = last_val
        rec["best_val_loss"] = best_val if best_val < float("inf") else None
        rec["train_seconds"] = train_seconds_prev + train_time
        writer.log(rec)
        last_rec.update(rec)
        if is_log or is_eval:
            msg = (f"step {step}/{cfg.train.max_steps} | loss {rec.get('loss', float('nan')):.4f}"
                   + (f" | val {last_val:.4f}" if is_eval else "")
                   + f" | lr {lr:.2e} | {rec.get('tokens_per_s', 0):,.0f} tok/s"
                   + f" | mfu {100 * rec.get('mfu', 0):.1f}% | mem {rec.get('peak_mem_mb', 0):.0f}MB")
            _log(rank, msg)

        if is_eval or is_ckpt:
            report = {k: v for k, v in last_rec.items() if isinstance(v, (int, float)) and v is not None}
            report.update(step=step, done=step == cfg.train.max_steps)
            if last_val is not None:
                report["val_loss"] = last_val
            if is_ckpt:
                save_and_report(step, report, last_val, final=step == cfg.train.max_steps)
            else:
                ray.train.report(report)
        elif is_log and world > 1 and _any_rank(sigterm.set, device):
            _log(rank, f"SIGTERM received: checkpointing step {step} before exit")
            writer.event("sigterm", step=step)
            save_and_report(step, {"step": step, "sigterm": True}, last_val, final=True)
        elif is_log and world == 1 and sigterm.set:
            _log(rank, f"SIGTERM received: checkpointing step {step} before exit")
            writer.event("sigterm", step=step)
            save_and_report(step, {"step": step, "sigterm": True}, last_val, final=True)
            sigterm.set = False
        elif step % (cfg.train.log_every * 10) == 0:
            # Spot reclaim: every rank asks (it is a barrier); save while there is time.
            info = ray.train.get_preemption_info()
            if info is not None:
                _log(rank, f"preemption notice for ranks {info.preempted_ranks}: checkpointing step {step}")
                writer.event("preemption", step=step, ranks=info.preempted_ranks)
                save_and_report(step, {"step": step, "preempted": True}, last_val)

    # ---------------------------------------------------------------- finish
    finish_pending()
    if rank == 0 and run_dir is not None:
        summary = {
            "best_val_loss": best_val if best_val < float("inf") else None,
            "final_val_loss": last_val,
            "steps": step,
            "tokens_per_s": last_rec.get("tokens_per_s"),
            "mfu": last_rec.get("mfu"),
            "train_seconds": round(train_seconds_prev + train_time, 3),
            "checkpoint": None,  # filled in by the driver (it knows the storage path)
            "world_size": world,
            "plan": plan.describe(),
            "params": n_params,
            "peak_mem_mb": last_rec.get("peak_mem_mb"),
        }
        write_json_atomic(Path(run_dir) / "summary.json", summary)
        try:
            plot_loss(run_dir)
        except Exception as e:  # a plot must never fail a finished run
            _log(rank, f"loss plot skipped: {e}")
    writer.event("end", step=step)
    writer.close()
    if rank == 0 and run_dir is not None and inject.get("run_uri"):
        from raygpt.train.metrics import upload_dir

        upload_dir(run_dir, inject["run_uri"])
