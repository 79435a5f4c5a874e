"""Host-side packing: ragged per-client NumPy arrays into one stacked Cohort.

Everything here is NumPy, runs outside jit and is deterministic in
``(seed, round_index, client_id)``. The number of local steps is rounded up to
a bucket so that a run compiles only a handful of round shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from fedjaxsim.core.client_batch import Cohort
from fedjaxsim.core.validation import InvalidArgument, check_int, check_optional_int

# Domain tag mixed into per-client shuffling seeds, so that shuffling never
# reuses the stream that cohort sampling draws from (see sampling.py).
_SHUFFLE_STREAM = 0x5EED_5F1E

WEIGHTINGS = ("num_examples", "num_processed", "num_tokens", "uniform")


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How each client's local data becomes local steps.

    Attributes:
      batch_size: examples per local step. The last partial batch of each epoch
        is padded and masked.
      num_epochs: local epochs E; each epoch is a fresh shuffle.
      max_steps: optional cap on local steps per client (after epochs).
      step_bucket: ``"pow2"`` rounds the step count up to a power of two;
        ``"geometric"`` to 8 buckets per power of two (at most 12.5% padding,
        a few more compiled shapes); an int ``k`` to a multiple of ``k``;
        ``"exact"`` does not round.
      weighting: ``"num_examples"`` weighs a client by its dataset size,
        ``"num_processed"`` by the real examples it trains on this round
        (differs from ``num_examples`` under ``num_epochs`` or ``max_steps``),
        ``"num_tokens"`` by its real tokens (entries of ``token_field`` that
        are not ``pad_id``: a next-token task's targets),
        ``"uniform"`` gives every real client weight 1.
      token_field: the field whose non-padding entries ``"num_tokens"`` counts.
      pad_id: the padding value of ``token_field``.
      shuffle: shuffle each epoch (deterministically); False keeps data order.
      check_finite: reject NaN or Inf in floating-point features.
    """

    batch_size: int = 20
    num_epochs: int = 1
    max_steps: int | None = None
    step_bucket: str | int = "pow2"
    weighting: str = "num_examples"
    shuffle: bool = True
    check_finite: bool = True
    token_field: str = "y"
    pad_id: int = 0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not isinstance(self.num_epochs, int) or self.num_epochs < 1:
            raise ValueError(f"num_epochs must be a positive int, got {self.num_epochs!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"max_steps must be None or a positive int, got {self.max_steps!r}")
        _check_bucket_rule("step_bucket", self.step_bucket)
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def steps_for(self, num_examples: int) -> int:
        """Real local steps of a client holding ``num_examples`` examples."""
        steps = self.num_epochs * math.ceil(num_examples / self.batch_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def num_processed(self, num_examples: int) -> int:
        """Real examples a client of ``num_examples`` trains on in a round."""
        per_epoch = math.ceil(num_examples / self.batch_size)
        full_epochs, extra_steps = divmod(self.steps_for(num_examples), per_epoch)
        # The partial batch closes an epoch, so the extra steps are full batches.
        return full_epochs * num_examples + extra_steps * self.batch_size

    def client_weight(self, num_examples: int) -> float:
        """The aggregation weight of a client holding ``num_examples`` examples."""
        if self.weighting == "num_examples":
            return float(num_examples)
        if self.weighting == "num_processed":
            return float(self.num_processed(num_examples))
        if self.weighting == "num_tokens":
            raise ValueError(
                "weighting='num_tokens' counts the tokens of each client's data, which "
                "pack_cohort sees but a size does not; packing several processes' shares "
                "supports num_examples, num_processed and uniform"
            )
        return 1.0

    def bucket(self, num_steps: int) -> int:
        """Rounds ``num_steps`` up to its bucket."""
        return _round_up(num_steps, self.step_bucket)


BUCKET_RULES = ("pow2", "geometric", "exact")


def _check_bucket_rule(name: str, rule) -> None:
    if rule not in BUCKET_RULES and not (
        isinstance(rule, int) and not isinstance(rule, bool) and rule >= 1
    ):
        raise InvalidArgument(
            name, f"{name} must be 'pow2', 'geometric', 'exact' or a positive int, got {rule!r}"
        )


def _round_up(count: int, rule: str | int) -> int:
    """``count`` (at least 1) rounded up under a bucket rule (see ``PackingConfig.step_bucket``)."""
    count = max(int(count), 1)
    if rule == "exact":
        return count
    if rule == "pow2":
        return 1 << (count - 1).bit_length()
    if rule == "geometric":
        granule = max(1, 1 << max(0, (count - 1).bit_length() - 4))
        return -(-count // granule) * granule
    return -(-count // rule) * rule


def client_count_bucket(
    num_clients: int, rule: str | int = "pow2", *, maximum: int | None = None
) -> int:
    """The padded client count of a cohort of ``num_clients`` clients.

    Variable cohorts (Poisson sampling) are padded to this count with
    ``pack_cohort(num_clients=...)``, so that a run compiles one round shape
    per bucket instead of one per cohort size.

    Args:
      num_clients: real clients in the cohort (``>= 0``; an empty cohort
        still gets one padding client).
      rule: ``"pow2"`` (the next power of two), ``"geometric"`` (8 buckets per
        power of two, at most 12.5% padding), ``"exact"``, or an int ``k``
        (the next multiple of ``k``), as ``PackingConfig.step_bucket``.
      maximum: optional cap, e.g. the population size, which no cohort
        exceeds; a bucket above it becomes ``max(maximum, num_clients)``.

    Returns:
      An int ``>= max(num_clients, 1)``.

    Raises:
      InvalidArgument: for a negative count, an unknown rule or a cap below 1.
    """
    num_clients = check_int("num_clients", num_clients, minimum=0)
    _check_bucket_rule("rule", rule)
    maximum = check_optional_int("maximum", maximum, minimum=1)
    bucket = _round_up(num_clients, rule)
    return bucket if maximum is None else max(min(bucket, maximum), num_clients, 1)


def default_num_lanes(backend: str | None = None, num_devices: int = 1) -> int | None:
    """The measured default lane layout (``pack_cohort(num_lanes=...)``).

    CPU: one lane per device, clients one after another in it, so that short
    clients never idle through the longest one's steps and each device runs a
    lone, unvmapped lane (benchmarks/RESULTS.md). Elsewhere ``None``: one
    client per lane, vmapped in chunks.
    """
    backend = jax.default_backend() if backend is None else backend
    return num_devices if backend == "cpu" else None


def client_num_examples(client: Mapping[str, np.ndarray], client_id: int) -> int:
    """Validates one client's arrays and returns its number of examples.

    Raises:
      ValueError: for a client with no fields, no examples, fields of different
        lengths, or non-numeric arrays.
    """
    if not client:
        raise ValueError(f"client {client_id} has no data fields")
    lengths = {}
    for name, array in client.items():
        array = np.asarray(array)
        if array.ndim == 0:
            raise ValueError(
                f"client {client_id} field {name!r} is a scalar; every field needs "
                "a leading example axis"
            )
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ValueError(
                f"client {client_id} field {name!r} has dtype {array.dtype}; "
                "only numeric or bool arrays can be packed"
            )
        lengths[name] = array.shape[0]
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"client {client_id} has fields of different lengths {lengths}; every "
            "field must have one entry per example"
        )
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError(f"client {client_id} has no examples; drop empty clients before sampling")
    return n


def _check_finite(client: Mapping[str, np.ndarray], client_id: int) -> None:
    for name, array in client.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(np.size(array) - np.isfinite(array).sum())
            raise ValueError(
                f"client {client_id} field {name!r} has {bad} NaN or Inf values; "
                "clean the data or drop the client"
            )


def client_step_indices(
    num_examples: int, config: PackingConfig, seed: int, round_index: int, client_id: int
) -> np.ndarray:
    """Example index of every slot of every local step of one client.

    Returns:
      int64[num_real_steps, batch_size], with -1 marking padding slots. Each
      epoch is a fresh permutation drawn from ``(seed, round_index, client_id)``,
      and the last partial batch of each epoch is padded.
    """
    batches_per_epoch = math.ceil(num_examples / config.batch_size)
    rng = np.random.default_rng([_SHUFFLE_STREAM, seed, round_index, client_id])
    epochs = []
    for _ in range(config.num_epochs):
        order = rng.permutation(num_examples) if config.shuffle else np.arange(num_examples)
        padded = np.full(batches_per_epoch * config.batch_size, -1, dtype=np.int64)
        padded[:num_examples] = order
        epochs.append(padded.reshape(batches_per_epoch, config.batch_size))
    steps = np.concatenate(epochs)
    return steps[: config.steps_for(num_examples)]


def assign_lanes(num_steps: Sequence[int], num_lanes: int) -> list[list[int]]:
    """Deterministic longest-first assignment of clients to lanes.

    Clients are taken in decreasing order of local steps (ties by cohort
    index) and each goes to the lane with the fewest steps so far (ties by
    lane index), which keeps the longest lane, and so the padded step count,
    close to ``sum(num_steps) / num_lanes``.

    Returns:
      For each lane, the cohort indices of its clients in training order.
    """
    lanes: list[list[int]] = [[] for _ in range(num_lanes)]
    loads = [0] * num_lanes
    order = sorted(range(len(num_steps)), key=lambda i: (-num_steps[i], i))
    for index in order:
        lane = min(range(num_lanes), key=lambda j: (loads[j], j))
        lanes[lane].append(index)
        loads[lane] += num_steps[index]
    return lanes


def _template_fields(template: Mapping[str, np.ndarray]) -> dict:
    """``{name: (per-example shape, dtype)}`` of a template client's fields."""
    if not isinstance(template, Mapping) or not template:
        raise InvalidArgument(
            "template",
            f"template must be a non-empty mapping from field name to array, got {template!r}",
        )
    specs = {}
    for name, array in template.items():
        array = np.asarray(array)
        if array.ndim == 0 or not (
            np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        ):
            raise InvalidArgument(
                "template",
                f"template field {name!r} has shape {array.shape} and dtype {array.dtype}; "
                "every field needs a leading example axis and a numeric or bool dtype",
            )
        specs[name] = (array.shape[1:], array.dtype)
    return specs


def pack_cohort(
    clients: Sequence[Mapping[str, np.ndarray]],
    client_ids: Sequence[int],
    config: PackingConfig,
    *,
    seed: int,
    round_index: int,
    num_total_clients: int,
    num_lanes: int | None = None,
    pad_lanes_to_multiple: int = 1,
    num_steps: int | None = None,
    num_clients: int | None = None,
    template: Mapping[str, np.ndarray] | None = None,
) -> Cohort:
    """Packs ragged clients into one stacked :class:`~fedjaxsim.core.client_batch.Cohort`.

    Args:
      clients: one mapping per sampled client from field name (e.g. ``"x"``,
        ``"y"``) to an array with a leading example axis. May be empty when
        ``num_clients`` and ``template`` are given (an all-padding cohort).
      client_ids: the population ids of ``clients``, used for shuffling seeds
        and per-client RNG.
      config: batching, epochs, bucketing and weighting.
      seed: experiment seed.
      round_index: the round being packed.
      num_total_clients: population size; ids must lie in ``[0, num_total_clients)``.
      num_lanes: ``None`` puts one client in each lane (``data[num_clients,
        num_steps, ...]``); an int packs the clients into that many lanes, one
        after another (see :func:`assign_lanes`), which removes most padding
        steps. Lanes are a packing decision; :func:`default_num_lanes` is
        the measured default per backend.
      pad_lanes_to_multiple: append empty lanes until the lane count is a
        multiple of this (e.g. the device count).
      num_steps: force this step count instead of the bucketed maximum.
      num_clients: pad the cohort to this many client entries (for variable
        cohorts, e.g. Poisson sampling; see :func:`client_count_bucket`). The
        ``num_clients - len(clients)`` padding entries come after the real
        clients, with weight 0, ``client_id == num_total_clients`` and no lane
        position, so the engine's records for them are zero and they change
        nothing. The lane axes then depend only on ``num_clients``,
        ``num_lanes`` and ``pad_lanes_to_multiple``: ``num_clients`` lanes of
        one client (``num_lanes=None``), or ``num_lanes`` lanes of
        ``max(1, num_clients - num_lanes + 1)`` positions, the most that
        :func:`assign_lanes` ever puts in one lane. The step axis is the
        bucket of the longest lane as usual (one step when all padding).
      template: one client's field mapping (e.g. the population's first
        client): the field names, per-example shapes and dtypes of an
        all-padding cohort. When clients are given too, theirs must match it.

    Returns:
      A Cohort of NumPy arrays.

    Raises:
      ValueError: on an empty cohort without ``num_clients`` and ``template``,
        empty or inconsistent clients, fields that differ between clients (or
        from ``template``), non-finite features, ids out of range, or
        ``num_clients`` below the number of clients (an ``InvalidArgument``
        naming the argument for the layout arguments).
    """
    num_real = len(clients)
    if num_real != len(client_ids):
        raise ValueError(f"got {num_real} clients but {len(client_ids)} client ids")
    if num_clients is not None:
        check_int("num_clients", num_clients, minimum=1)
        if num_clients < num_real:
            raise InvalidArgument(
                "num_clients",
                f"num_clients={num_clients} is smaller than the {num_real} clients of the "
                "cohort; pad to client_count_bucket(len(clients)) or more",
            )
    if num_real == 0 and (num_clients is None or template is None):
        raise ValueError(
            "cannot pack an empty cohort without padding: sample at least one client, "
            "or pass num_clients (e.g. client_count_bucket(0)) and template (one client's "
            "fields, for the shapes) to pack an all-padding cohort"
        )
    ids = np.asarray(client_ids, dtype=np.int64).reshape(num_real)
    if num_real and (ids.min() < 0 or ids.max() >= num_total_clients):
        raise ValueError(
            f"client ids must lie in [0, {num_total_clients}); got range [{ids.min()}, {ids.max()}]"
        )
    if len(np.unique(ids)) != num_real:
        raise ValueError("client ids in one cohort must be distinct")
    if not isinstance(pad_lanes_to_multiple, int) or pad_lanes_to_multiple < 1:
        raise InvalidArgument(
            "pad_lanes_to_multiple",
            f"pad_lanes_to_multiple must be >= 1, got {pad_lanes_to_multiple!r}",
        )
    if num_lanes is not None and (
        not isinstance(num_lanes, int) or isinstance(num_lanes, bool) or num_lanes < 1
    ):
        raise InvalidArgument(
            "num_lanes", f"num_lanes must be None or a positive int, got {num_lanes!r}"
        )
    check_optional_int("num_steps", num_steps, minimum=1)
    template_fields = None if template is None else _template_fields(template)
    reference_fields = template_fields
    sizes = []
    for client, client_id in zip(clients, ids):
        sizes.append(client_num_examples(client, int(client_id)))
        fields = {
            name: (np.asarray(a).shape[1:], np.asarray(a).dtype) for name, a in client.items()
        }
        if reference_fields is None:
            reference_fields, reference_owner = fields, f"client {int(client_id)}"
        elif fields != reference_fields:
            owner = "the template" if template_fields is not None else reference_owner
            raise ValueError(
                f"client {int(client_id)} has fields {fields}, but {owner} has "
                f"{reference_fields}; all clients need the same field names, per-example "
                "shapes and dtypes"
            )
        if config.check_finite:
            _check_finite(client, int(client_id))

    step_indices = [
        client_step_indices(n, config, seed, round_index, int(cid)) for n, cid in zip(sizes, ids)
    ]
    padded_count = num_real if num_clients is None else num_clients
    if num_lanes is None:
        lanes = [[i] for i in range(num_real)]
        lane_count, clients_per_lane = padded_count, 1
    else:
        lanes = [lane for lane in assign_lanes([len(s) for s in step_indices], num_lanes) if lane]
        lane_count = num_lanes
        clients_per_lane = max((len(lane) for lane in lanes), default=1)
        if num_clients is not None:
            # assign_lanes gives each of the first num_lanes clients a lane of
            # its own (every client has a step), so no lane holds more.
            bound = max(1, num_clients - num_lanes + 1)
            assert clients_per_lane <= bound, (clients_per_lane, bound)
            clients_per_lane = bound
    longest = max((sum(len(step_indices[i]) for i in lane) for lane in lanes), default=0)
    total_steps = config.bucket(longest) if num_steps is None else num_steps
    if total_steps < longest:
        raise ValueError(
            f"num_steps={total_steps} is smaller than the {longest} local steps a "
            "lane needs; raise num_steps or set max_steps"
        )
    total_lanes = -(-lane_count // pad_lanes_to_multiple) * pad_lanes_to_multiple
    batch = config.batch_size

    data = {
        name: np.zeros((total_lanes, total_steps, batch, *shape), dtype=dtype)
        for name, (shape, dtype) in reference_fields.items()
    }
    mask = np.zeros((total_lanes, total_steps, batch), dtype=bool)
    step_position = np.zeros((total_lanes, total_steps), dtype=np.int32)
    lane_clients = np.full((total_lanes, clients_per_lane), padded_count, dtype=np.int32)
    for lane_index, lane in enumerate(lanes):
        lane_clients[lane_index, : len(lane)] = lane
        cursor = 0
        for position, client_index in enumerate(lane):
            indices = step_indices[client_index]
            steps = slice(cursor, cursor + len(indices))
            # Steps up to the end of the lane belong to the last client; they are
            # all padding, so they leave it unchanged.
            step_position[lane_index, cursor:] = position
            mask[lane_index, steps] = indices >= 0
            slots = indices.reshape(-1)
            valid = slots >= 0
            for name, array in clients[client_index].items():
                shape = reference_fields[name][0]
                flat = data[name][lane_index, steps].reshape(len(indices) * batch, *shape)
                flat[valid] = np.asarray(array)[slots[valid]]
                data[name][lane_index, steps] = flat.reshape(len(indices), batch, *shape)
            cursor += len(indices)

    # Padding clients: weight 0 and the out-of-range id (never -1, which wraps).
    weight = np.zeros(padded_count, dtype=np.float32)
    if config.weighting == "num_tokens":
        weight[:num_real] = [
            np.count_nonzero(np.asarray(client[config.token_field]) != config.pad_id)
            for client in clients
        ]
    else:
        weight[:num_real] = [config.client_weight(n) for n in sizes]
    client_id = np.full(padded_count, num_total_clients, dtype=np.int32)
    client_id[:num_real] = ids
    return Cohort(
        data=data,
        mask=mask,
        step_position=step_position,
        lane_clients=lane_clients,
        weight=weight,
        client_id=client_id,
    )


TEST_FLAG = "is_test"


def pack_fine_tune_then_test(
    train_clients: Sequence[Mapping[str, np.ndarray]],
    test_clients: Sequence[Mapping[str, np.ndarray]],
    client_ids: Sequence[int],
    *,
    num_finetune_steps: int,
    batch_size: int,
    eval_batch_size: int | None = None,
    seed: int = 0,
    round_index: int = 0,
    num_total_clients: int | None = None,
) -> Cohort:
    """One client per lane: ``k`` fine-tuning steps, then every test batch.

    The layout of personalization evaluation
    (``fedjaxsim.algorithms.personalization``): each client takes exactly
    ``num_finetune_steps`` steps on its training data (re-shuffled epochs as
    needed), then its test data follows in order, unshuffled, each example
    flagged in the data field ``"is_test"``. Batches of the two phases are
    padded to the larger batch size.

    Args:
      train_clients: per client, the arrays it fine-tunes on.
      test_clients: per client (same order and fields), the arrays it is
        evaluated on.
      client_ids: population ids (shuffling seeds and per-client RNG).
      num_finetune_steps: ``k >= 0`` local steps (0: evaluate only).
      batch_size: fine-tuning batch size.
      eval_batch_size: test batch size; defaults to ``batch_size``.
      seed, round_index: shuffling seeds of the fine-tuning batches.
      num_total_clients: population size; defaults to ``max(client_ids) + 1``.

    Returns:
      A Cohort of NumPy arrays with uniform weights, in the order of ``client_ids``.

    Raises:
      ValueError: for mismatched lengths or a negative step count, and
        whatever :func:`pack_cohort` rejects.
    """
    if len(train_clients) != len(test_clients) or len(train_clients) != len(client_ids):
        raise ValueError(
            f"got {len(train_clients)} train clients, {len(test_clients)} test clients and "
            f"{len(client_ids)} client ids; they must match"
        )
    check_int("num_finetune_steps", num_finetune_steps, minimum=0)
    if num_total_clients is None:
        num_total_clients = int(max(client_ids)) + 1
    eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
    common = {"seed": seed, "round_index": round_index, "num_total_clients": num_total_clients}
    test_config = PackingConfig(
        batch_size=eval_batch_size, shuffle=False, step_bucket="exact", weighting="uniform"
    )
    phases = [(pack_cohort(test_clients, client_ids, test_config, **common), True)]
    if num_finetune_steps:
        fewest_batches = min(
            math.ceil(len(next(iter(client.values()))) / batch_size) for client in train_clients
        )
        train_config = PackingConfig(
            batch_size=batch_size,
            num_epochs=math.ceil(num_finetune_steps / fewest_batches),
            max_steps=num_finetune_steps,
            step_bucket="exact",
            weighting="uniform",
        )
        train = pack_cohort(
            train_clients, client_ids, train_config, num_steps=num_finetune_steps, **common
        )
        phases.insert(0, (train, False))
    widest = max(cohort.batch_size for cohort, _ in phases)

    def widen(array):
        padding = [(0, 0), (0, 0), (0, widest - array.shape[2])] + [(0, 0)] * (array.ndim - 3)
        return np.pad(array, padding)

    def joined(get):
        return np.concatenate([widen(get(cohort, is_test)) for cohort, is_test in phases], axis=1)

    data = {
        name: joined(lambda cohort, _, name=name: cohort.data[name]) for name in phases[0][0].data
    }
    data[TEST_FLAG] = joined(lambda cohort, is_test: np.full(cohort.mask.shape, is_test))
    mask = joined(lambda cohort, _: cohort.mask)
    test = phases[-1][0]
    return test._replace(data=data, mask=mask, step_position=np.zeros(mask.shape[:2], np.int32))
