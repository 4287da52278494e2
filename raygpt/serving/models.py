"""The model a replica serves, and its lifecycle (like vLLM's serving_models.py): load,
version check, swap, retire, drain, health, what the replica publishes, the model card.

`reconfigure(user_config)` loads the new directory in a thread while the old engine
keeps serving, warms it up, then swaps it in; requests hold the engine they started on,
so in-flight requests finish on the old model (`retired` engines close once idle). The
same path with a new version (a re-export) is reloaded; a directory that fails to load,
or whose version is not the one asked for, is refused: the old model keeps serving and
the error is kept (`last_error`, only admins see it). Each replica publishes what it
serves in Ray's KV store (`replica_state`), so promote can check every replica; a
drain (raygpt serve's SIGTERM) is polled from there too.
"""
import asyncio
import json
import logging
import threading
import time
from pathlib import Path

from ray import serve

from raygpt.errors import UserError
from raygpt.serving import adapter
from raygpt.serving.protocol import ApiError
from raygpt.serving.replicas import drain_requested, state_key
from raygpt.serving.settings import ServerSettings

log = logging.getLogger("ray.serve")


def replica_id() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


class ModelManager:
    """The current engine (`engine`), the ones draining after a swap (`retired`), the last
    refused update (`last_error`) and whether the replica drains (`draining`)."""

    def __init__(self, s: ServerSettings, metrics, app_name: str):
        self.s, self.metrics, self.app_name = s, metrics, app_name
        self.engine = None
        self.last_error: dict | None = None
        self.retired: list = []  # engines draining after a swap (their stats still count)
        self.draining = False
        self._reconf_lock = asyncio.Lock()
        self._totals = {"decode_steps": 0, "tokens_generated": 0, "requests_finished": 0,
                        "prefills": 0}
        self._n_engines = 0
        self._init_model_dir = s.model_dir

    def watch_drain_in_replica(self) -> None:
        """In a Serve replica, start polling the app's drain key (see _watch_drain)."""
        if replica_id() is not None:
            threading.Thread(target=self._watch_drain, daemon=True).start()

    def _fault_hook(self):
        """Testing aid (settings.fault_file): steps fail while the file names this replica
        (or '*'), standing in for a broken accelerator."""
        path, me = self.s.fault_file, replica_id()

        def hook():
            try:
                who = Path(path).read_text().split()
            except OSError:
                return
            if "*" in who or me in who:
                raise RuntimeError(f"injected device failure ({path})")
        return hook

    async def _swap_in(self, model_dir: str, want_version: str | None = None):
        self._n_engines += 1
        name = f"engine{self._n_engines}"
        if self.s.engine_process:
            from raygpt.serving.core_process import load_process_engine

            eng = await asyncio.to_thread(load_process_engine, model_dir, self.s, name, self.metrics,
                                          replica_id())
        else:
            eng = await asyncio.to_thread(adapter.load_engine, model_dir, self.s, name, self.metrics)
        if want_version and eng.version != want_version:
            eng.abort()
            raise UserError(f"{model_dir} holds version {eng.version}, not the {want_version} "
                            "this update asked for (changed while promoting?)")
        if self.s.fault_file and not self.s.engine_process:  # a process engine installs its own
            eng.fault_hook = self._fault_hook()
        old, self.engine = self.engine, eng
        log.info("raygpt: serving model %s (version %s)", model_dir, eng.version)
        self._publish()
        if old is not None:
            self.retired.append(old)
            threading.Thread(target=self._retire, args=(old,), daemon=True).start()
        return eng

    def _publish(self) -> None:
        """What this replica serves, in Ray's KV store (promote checks every replica;
        a draining driver waits for every replica's `idle`)."""
        rid = replica_id()
        if rid is None:
            return
        try:
            from raygpt.raycompat import kv_put

            kv_put(state_key(self.app_name, rid), json.dumps(
                {"model_dir": getattr(self.engine, "model_dir", None),
                 "version": getattr(self.engine, "version", None),
                 "last_update_error": self.last_error, "draining": self.draining, "idle": self._idle(),
                 "time": time.time()}).encode())
        except Exception as e:  # noqa: BLE001 - observability only
            log.warning("raygpt: cannot publish replica state: %s", e)

    def _idle(self) -> bool:
        return all(e.idle for e in [self.engine, *self.retired] if e is not None)

    def _watch_drain(self) -> None:
        """Polls the app's drain key (set by `raygpt serve` on SIGTERM, see replicas.py):
        from then on new requests get 503, and the replica republishes whether it is idle."""
        while True:
            time.sleep(0.5)  # one KV read per replica per 0.5 s
            try:
                if self.draining or drain_requested(self.app_name):
                    if not self.draining:
                        log.info("raygpt: draining: new requests get 503 until this replica stops")
                    self.draining = True
                    self._publish()
            except Exception:  # noqa: BLE001 - Ray shutting down: nothing left to drain
                return

    def _retire(self, old):
        old.close(wait=True)  # in-flight requests finish on the old model
        st = old.stats()
        for k in self._totals:
            self._totals[k] += st[k]
        self.retired = [e for e in self.retired if e is not old]
        log.info("raygpt: retired model version %s", old.version)

    async def reconfigure(self, user_config: dict | None):
        user_config = dict(user_config or {})
        unknown = set(user_config) - {"model_dir", "version"}
        model_dir = user_config.get("model_dir") or self.s.model_dir
        want = user_config.get("version")
        async with self._reconf_lock:
            if unknown:
                self.last_error = {"model_dir": model_dir, "error": f"unknown user_config keys "
                                   f"{sorted(unknown)} (known: ['model_dir', 'version'])",
                                   "time": int(time.time())}
                log.error("raygpt: %s", self.last_error["error"])
            if not model_dir:
                raise UserError("no model_dir: set args.model_dir or user_config.model_dir")
            if self.engine is not None and model_dir == self.engine.model_dir:
                # the same path: reload only when what it holds changed (a re-export)
                try:
                    from raygpt.model.io import read_model_config

                    on_disk = read_model_config(model_dir).get("version")
                except Exception:  # noqa: BLE001 - a broken dir: keep serving what we have
                    on_disk = self.engine.version
                if on_disk == self.engine.version and want in (None, self.engine.version):
                    return
            try:
                await self._swap_in(model_dir, want)
                self.last_error = None
                self._publish()
            except Exception as e:
                msg = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
                if getattr(e, "fits_alone", False):  # KVBudgetError: not beside the old model
                    msg += ("; it fits once the model serving now is gone: redeploy the app "
                            "with this model_dir (fresh replicas load it alone)")
                self.last_error = {"model_dir": model_dir, "error": msg, "time": int(time.time())}
                self._publish()
                if self.engine is not None:
                    log.error("raygpt: refused model update to %s, still serving %s: %s",
                              model_dir, self.engine.model_dir, msg)
                    return
                # No model yet (replica start): fall back to args.model_dir when it differs.
                if self._init_model_dir and self._init_model_dir != model_dir:
                    log.error("raygpt: cannot load %s (%s); falling back to %s",
                              model_dir, msg, self._init_model_dir)
                    await self._swap_in(self._init_model_dir)
                    return
                raise

    async def current(self):
        """The engine to serve with (the first request loads args.model_dir when no
        user_config did); 503 with no model."""
        if self.engine is None and self.s.model_dir:
            await self.reconfigure(None)
        if self.engine is None:
            raise ApiError(503, "no model is loaded yet", "server_error", code="model_not_ready")
        return self.engine

    def check_health(self):
        e = self.engine
        if e is None:
            return
        if e._thread is None or not e._thread.is_alive():
            raise RuntimeError("the generation engine thread died")
        if e.consecutive_failed_steps >= self.s.max_failed_steps:
            raise RuntimeError(f"{e.consecutive_failed_steps} engine steps in a row failed "
                               "(a broken device?): replace this replica")

    def card(self, admin: bool = False) -> dict:
        """The served model; where it was loaded from and why the last update was refused
        only for admins (/admin/model): clients see no paths on the server nor its errors."""
        e = self.engine
        card = {"id": self.s.model_name, "object": "model", "owned_by": "raygpt",
                "created": getattr(e, "loaded_at", None)}
        if e is not None:
            card.update(version=e.version,
                        context_length=e.block_size, max_model_len=e.block_size, vocab_size=e.cfg.vocab_size,
                        replica=replica_id())
        if admin:
            card.update(model_dir=getattr(e, "model_dir", None), last_update_error=self.last_error)
        return card

    def stats(self) -> dict:
        """Engine counters: totals over every engine this replica ran, the current one's,
        and each live one's (GET /v1/stats)."""
        engines = [e for e in self.retired] + ([self.engine] if self.engine else [])
        totals = dict(self._totals)
        per = []
        for e in engines:
            st = e.stats()
            per.append(st)
            for k in totals:
                totals[k] += st[k]
        cur = self.engine.stats() if self.engine else None
        return {"totals": totals, "current": cur, "engines": per, "replica": replica_id()}

    def engine_gauges(self):
        if self.engine is not None:
            st = self.engine.stats()
            self.metrics.engine_state(st["waiting"], st["active"])
