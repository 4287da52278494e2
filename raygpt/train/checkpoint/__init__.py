"""Sharded checkpoints with torch.distributed.checkpoint (DCP), one concern a module:
io (save, load, the trainer state file), discovery (which checkpoints a run directory
holds and whether each is complete), rng (per-rank generator state) and manager (when to
save, async saves in flight, reporting, what a restart resumes from). Export to a model
directory is raygpt.train.export.

Layout of one checkpoint directory (Ray Train merges every rank's files into it):
  .metadata, __<rank>_0.distcp   DCP shards of {"model", "optim"} (FQN keys, no wrapper
                                 prefixes: get_state_dict strips DDP/AC/compile names)
  raygpt_state.json              step, world size, plan, config, RNG: written by rank 0
  tokenizer.json                 so a checkpoint exports without the data directory
  rng/rank<r>.pt                 each rank's generator state

Restore loads into whatever plan runs now: DCP reshards by global tensor coordinates.
Ray Train registers a checkpoint only after every rank reported it, so a save that
crashed half-way is never the "latest" one.
"""
