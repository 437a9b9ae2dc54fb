"""A run's training state in its workdir (``families.store`` has the directory layout): params,
optimizer state, LoRA factors, data position and stage, one orbax step each.

Integrity: orbax writes each step into ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>``
only once every item is on disk (on GCS, where renames are not atomic, it writes ``commit_success.txt``
last instead), and lists only finished steps; so a step that was interrupted while being written is
never taken as the newest. The training checkpointer also removes such leftovers (in the background,
done before its first save). Restoring into a target (the model the config builds) first compares the
stored tree and shapes with it and reports the first difference in one line (``CheckpointMismatch``).
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from etils import epath

from mllm_jax import paths
from mllm_jax.errors import CheckpointMismatch
from mllm_jax.families.store import LORA, is_checkpoint, latest_step, manager


def finished_stages(directory: str, stages: list[tuple[str, int]]) -> tuple[str, ...] | None:
    """Names of the leading ``(name, steps)`` stages the newest training checkpoint in ``directory``
    has finished, or None when there is nothing to resume from (read-only)."""
    step = latest_step(directory) if is_checkpoint(directory) else None
    if step is None:
        return None
    with manager(directory, write=False) as m:
        meta = m.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    names = [name for name, _ in stages]
    if meta.get("stage") not in names:
        return ()  # the trainer reports this checkpoint's stage itself
    index = names.index(meta["stage"])
    return tuple(names[: index + int(meta.get("stage_step", 0) >= stages[index][1])])


# ---------------------------------------------------------------- training state


class TrainCheckpointer:
    """One orbax manager per run (async saves need it to outlive the call). Items per step: ``params``
    (full tree, what predict/export read), ``meta`` (stage and position), and while a stage is in
    progress ``opt_state`` and ``data`` (the iterator state)."""

    def __init__(self, directory: str, keep: int | None = None, async_save: bool = True):
        self.directory = directory
        self._manager = manager(directory, max_to_keep=keep, async_save=async_save)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self,
        step: int,
        params,
        meta: dict,
        opt_state=None,
        data_state=None,
        wait: bool = False,
        lora=None,
        reference=None,
    ):
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        if lora:  # a LoRA stage's factors, mid-stage (``params`` then holds the unmerged base)
            items[LORA] = ocp.args.StandardSave(lora)
        if reference is not None:  # a DPO stage's frozen starting params, mid-stage
            items["reference"] = ocp.args.StandardSave(reference)
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if wait:
            self._manager.wait_until_finished()

    def restore(self, step: int, name: str, target=None):
        """Item ``name`` of ``step``; a ``target`` tree (arrays or ShapeDtypeStructs) fixes the layout
        and must match the stored tree and shapes (else ``CheckpointMismatch``)."""
        if name in ("meta", "data"):
            arg = ocp.args.JsonRestore()
        else:
            if target is not None:
                check_matches(self.item_path(step, name), target, step, name)
            arg = ocp.args.StandardRestore(target)
        return self._manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]

    def item_path(self, step: int, name: str) -> str:
        return paths.join(str(self._manager.directory), str(step), name)

    def wait(self):
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()


def abstract(x) -> jax.ShapeDtypeStruct:
    """An array's restore target: its shape, dtype and layout."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


# ---------------------------------------------------------------- integrity


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def shapes_by_path(tree) -> dict[str, tuple]:
    """``{"llm/layers_0/mlp/gate/kernel": shape}`` for every array leaf. Orbax stores namedtuples (optax
    states) as dicts, so keys are compared by name whatever their node type."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def stored_shapes(item_dir: str) -> dict[str, tuple]:
    """Paths and shapes of a saved pytree item, from its metadata (no array is read)."""
    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir))
    return shapes_by_path(getattr(metadata, "tree", metadata))


def first_mismatch(stored: dict[str, tuple], wanted: dict[str, tuple]) -> str | None:
    """The first difference between two ``shapes_by_path`` tables, in words, or None."""
    for path, shape in wanted.items():
        if path not in stored:
            return f"{path} is in the config but not in the checkpoint"
        if stored[path] != shape:
            return f"{path} has shape {stored[path]} in the checkpoint, {shape} in the config"
    extra = next((p for p in stored if p not in wanted), None)
    return None if extra is None else f"{extra} is in the checkpoint but not in the config"


def check_matches(item_dir: str, target, step: int, name: str = "params"):
    if not paths.isdir(item_dir):
        raise CheckpointMismatch(f"checkpoint step {step} has no {name!r} (in {paths.dirname(item_dir)})")
    problem = first_mismatch(stored_shapes(item_dir), shapes_by_path(target))
    if problem is not None:
        where = "" if name == "params" else f"{name} "
        raise CheckpointMismatch(f"checkpoint step {step} does not match the model: {where}{problem}")


def encode_state(state):
    """JSON-safe form of a data iterator state (bytes become base64)."""
    import base64

    if isinstance(state, bytes):
        return {"__b64__": base64.b64encode(state).decode()}
    if isinstance(state, dict):
        return {k: encode_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [encode_state(v) for v in state]
    return state


def decode_state(state):
    import base64

    if isinstance(state, dict):
        if set(state) == {"__b64__"}:
            return base64.b64decode(state["__b64__"])
        return {k: decode_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [decode_state(v) for v in state]
    return state
