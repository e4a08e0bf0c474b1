"""Train checkpoints: Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Each checkpoint holds three items, written together and atomically (Orbax writes a temporary directory and
renames it when every item is complete, so a run killed mid-save leaves the previous checkpoints intact):
  state  TrainState (params, optimizer state, step, RNG, non-finite counters), sharded arrays
  data   the data iterator's state (grain's checkpoint handler: one JSON file per process)
  meta   JSON: the run config and counters
Restoring takes an abstract state whose leaves carry the target shardings, so a checkpoint written on one mesh
shape restores onto another (each host reads only its shards).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional


log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int, async_save: bool = True):
        import grain
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self._grain = grain
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=max(int(keep), 1), create=True,
            cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict, force: bool = False) -> bool:
        """Save if `step` is due (every N steps) or `force`. Returns whether a save started.

        The device->host copy of `state` finishes before this returns (the step after may donate it); the
        file writes go on in the background unless async_save=False."""
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=self._grain.checkpoint.CheckpointSave(data_iterator),
                                  meta=ocp.args.JsonSave(meta))
        return self.manager.save(int(step), args=args, force=force)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`; `data_iterator` is set to its saved position in place."""
        ocp = self._ocp
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=self._grain.checkpoint.CheckpointRestore(data_iterator),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(int(step), args=args)
        return restored["state"], dict(restored["meta"] or {})

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the TrainState of checkpoint `step` (e.g. onto a different mesh, for export or eval)."""
        ocp = self._ocp
        restored = self.manager.restore(int(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
