"""Run checkpoints with Orbax: exact resume, atomic commits, no pickle.

A checkpoint of round ``r`` (``OUTPUT_DIR/checkpoints/<r>/``) holds three
Orbax items:

* ``state``: the algorithm's server state (a pytree of arrays; its structure
  comes back from the freshly built algorithm's ``init``);
* ``clients``: the :class:`~fedjaxsim.core.client_state.ClientStateStore`'s
  ``state_dict()`` for stateful algorithms, once any client has state;
* ``meta``: JSON: the round, the seed and root RNG key, the resolved config,
  a fingerprint of the data, and the metrics history.

Nothing else is needed to continue exactly, because every other random choice
is a pure function of ``(seed, round)``: the cohort
(``core.sampling.sample_uniform``), each client's shuffles
(``core.packing``, from ``(seed, round, client_id)``), the round RNG
(``fold_in(key(seed), round)``), the model init and the data partition (the
seed) and the per-client evaluation sample (the seed). So the sampler's
"state" is the round number, and the RNG state is the seed's key, which the
checkpoint stores to check, not to replay.

Crash safety is Orbax's: items are written into a temporary folder that is
renamed to ``<r>`` only once complete, so a crash during a save leaves at
most an uncommitted temporary folder, which is ignored (and removed when the
next run opens the folder); the latest committed checkpoint is untouched.
Arrays are stored with tensorstore and the metadata as JSON: restoring never
unpickles anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from fedjaxsim.runner import faults

# Bumped whenever what a checkpoint holds changes meaning, so that an older
# run is refused with a clear message instead of a confusing config or restore
# error. 2: server states carry ``aggregator_state``, and the config has one
# section per algorithm and dataset family (issue 13).
FORMAT_VERSION = 2


class _MetaHandler(ocp.handlers.JsonCheckpointHandler):
    """Orbax's JSON handler plus the ``hang_in_save`` fault-injection point."""

    async def async_save(self, directory, item=None, args=None):
        futures = await super().async_save(directory, item, args)
        payload = args.item if args is not None else item
        faults.maybe_hang_in_save(int(payload["round"]))
        return futures


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for item in ("state", "clients"):
        registry.add(item, ocp.args.StandardSave)
        registry.add(item, ocp.args.StandardRestore)
    meta = _MetaHandler()
    registry.add("meta", ocp.args.JsonSave, meta)
    registry.add("meta", ocp.args.JsonRestore, meta)
    return registry


class RunCheckpointer:
    """Saves and restores run checkpoints in ``directory`` (created if needed).

    Args:
      directory: the checkpoint folder.
      keep: how many of the latest checkpoints to keep.
    """

    def __init__(self, directory: str | Path, keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            # Synchronous saves: a save is committed before the next round
            # starts, which is what the crash tests rely on; server states are
            # small next to a round's compute.
            enable_async_checkpointing=False,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, handler_registry=_registry()
        )

    def latest_round(self) -> int | None:
        """Round of the latest committed checkpoint, or None."""
        return self._manager.latest_step()

    def all_rounds(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(
        self,
        round_number: int,
        server_state: Any,
        client_store_state: Mapping[str, Any] | None,
        meta: Mapping[str, Any],
    ) -> None:
        """Writes and commits the checkpoint of ``round_number``.

        Args:
          round_number: rounds completed.
          server_state: pytree of arrays.
          client_store_state: ``ClientStateStore.state_dict()`` or None. A
            store with no written client is not saved (Orbax cannot store
            zero-size arrays); ``meta["client_store_rows"]`` says so.
          meta: JSON-serialisable dict; must contain ``"round"``.
        """
        items = {
            "state": ocp.args.StandardSave(server_state),
            "meta": ocp.args.JsonSave(dict(meta)),
        }
        if client_store_state is not None and int(meta.get("client_store_rows", 0)) > 0:
            items["clients"] = ocp.args.StandardSave(dict(client_store_state))
        self._manager.save(round_number, args=ocp.args.Composite(**items), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, round_number: int) -> dict:
        """The JSON item of a checkpoint (cheap: no arrays are read)."""
        restored = self._manager.restore(
            round_number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
        )
        return dict(restored.meta)

    def restore(self, round_number: int, abstract_server_state: Any):
        """Restores a checkpoint.

        Args:
          round_number: which checkpoint.
          abstract_server_state: the server state's structure, dtypes and
            shapes (e.g. ``jax.eval_shape`` of the algorithm's ``init``).

        Returns:
          ``(server_state, client_store_state or None, meta)``.
        """
        meta = self.read_meta(round_number)
        items = {"state": ocp.args.StandardRestore(abstract_server_state)}
        if int(meta.get("client_store_rows", 0)) > 0:
            items["clients"] = ocp.args.StandardRestore()
        restored = self._manager.restore(round_number, args=ocp.args.Composite(**items))
        clients = restored.clients if "clients" in items else None
        return restored.state, clients, meta

    def close(self) -> None:
        self._manager.close()
