"""Checks on client data, and the option to drop bad clients with a warning.

Real federated files hold what their writers handed in. A client can be
empty, have fewer labels than images, carry a label outside the class range
or a NaN pixel. Each is an error that names the file and the client, unless
the caller passes ``drop_invalid=True``: then such clients are dropped and one
:class:`DroppedClientsWarning` says how many, and why. Duplicate client ids
are always an error, since neither copy is obviously the right one.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from fedjaxsim.data.federated import FederatedData


class DroppedClientsWarning(UserWarning):
    """Some clients were dropped because ``drop_invalid=True`` was passed."""


class InvalidClient(ValueError):
    """Why a client cannot be used.

    Args:
      kind: a short category used to count dropped clients ("empty", ...).
      detail: the full reason, completing "client 'id' ...".
    """

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


def client_problem(
    fields: Mapping[str, np.ndarray],
    *,
    num_classes: int | None,
    label_field: str = "y",
    declared_num_examples: int | None = None,
) -> InvalidClient | None:
    """Why one client's raw arrays cannot be used, or None when they can.

    Args:
      fields: field name -> array with a leading example axis.
      num_classes: labels must lie in ``[0, num_classes)``; None skips the check.
      label_field: the field holding integer class labels (skipped if absent).
      declared_num_examples: the count the file states for this client, if any.

    Returns:
      The problem (not raised) or None.
    """
    lengths = {}
    for name, array in fields.items():
        if np.ndim(array) == 0:
            return InvalidClient(
                "bad shape", f"field {name!r} is a scalar, not one entry per example"
            )
        lengths[name] = len(array)
    if not lengths:
        return InvalidClient("empty", "has no fields")
    if len(set(lengths.values())) != 1:
        return InvalidClient("length mismatch", f"has fields of different lengths {lengths}")
    count = next(iter(lengths.values()))
    if declared_num_examples is not None and declared_num_examples != count:
        return InvalidClient(
            "count mismatch", f"is declared with {declared_num_examples} examples but holds {count}"
        )
    if count == 0:
        return InvalidClient("empty", "has no examples")
    for name, array in fields.items():
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            return InvalidClient("NaN/Inf", f"has {bad} NaN or Inf values in field {name!r}")
    if label_field in fields and num_classes is not None:
        labels = np.asarray(fields[label_field])
        if not np.issubdtype(labels.dtype, np.integer) and not (
            np.issubdtype(labels.dtype, np.floating) and np.all(labels == np.round(labels))
        ):
            return InvalidClient(
                "bad labels", f"has non-integer labels in field {label_field!r} ({labels.dtype})"
            )
        outside = labels[(labels < 0) | (labels >= num_classes)]
        if outside.size:
            return InvalidClient(
                "label out of range",
                f"has {outside.size} labels outside [0, {num_classes}) in field "
                f"{label_field!r} (e.g. {outside.flat[0]})",
            )
    return None


class ClientCollector:
    """Validates clients one at a time and assembles a FederatedData.

    Args:
      source: what the clients come from (a file name), quoted in errors.
      num_classes: label range for :func:`client_problem`.
      label_field: the label field's name.
      drop_invalid: drop bad clients (one warning at the end) instead of raising.
    """

    def __init__(
        self,
        source: str,
        *,
        num_classes: int | None,
        label_field: str = "y",
        drop_invalid: bool = False,
    ):
        self.source = source
        self.num_classes = num_classes
        self.label_field = label_field
        self.drop_invalid = drop_invalid
        self._names: list[str] = []
        self._clients: list[dict[str, np.ndarray]] = []
        self._seen: set[str] = set()
        self._dropped: collections.Counter[str] = collections.Counter()
        self._first_dropped: dict[str, str] = {}

    def _reject(self, name: str, problem: InvalidClient, origin: str | None) -> None:
        if not self.drop_invalid:
            raise ValueError(
                f"{origin or self.source}: client {name!r} {problem.detail}. Fix the file, or pass "
                "drop_invalid=True to drop such clients with a warning."
            )
        self._dropped[problem.kind] += 1
        self._first_dropped.setdefault(problem.kind, name)

    def add(
        self,
        name: str,
        fields: Mapping[str, np.ndarray],
        *,
        declared_num_examples: int | None = None,
        convert: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
        origin: str | None = None,
    ) -> bool:
        """Checks one client and keeps it (after ``convert``) if it is valid.

        Args:
          name: the client's id; a repeated id raises ValueError.
          fields: raw arrays as read from the file.
          declared_num_examples: the count the file states for the client.
          convert: maps valid raw arrays to stored arrays; it may raise
            :class:`InvalidClient` to reject the client with a reason.
          origin: the file holding this client, named in errors (default ``source``).

        Returns:
          True when the client was kept.
        """
        if name in self._seen:
            raise ValueError(
                f"{origin or self.source}: duplicate client id {name!r}; every client needs a "
                "distinct id"
            )
        self._seen.add(name)
        problem = client_problem(
            fields,
            num_classes=self.num_classes,
            label_field=self.label_field,
            declared_num_examples=declared_num_examples,
        )
        if problem is None and convert is not None:
            try:
                fields = convert(dict(fields))
            except InvalidClient as error:
                problem = error
        if problem is not None:
            self._reject(name, problem, origin)
            return False
        if self._clients and list(fields) != list(self._clients[0]):
            raise ValueError(
                f"{self.source}: client {name!r} has fields {list(fields)}, the first client "
                f"{self._names[0]!r} has {list(self._clients[0])}"
            )
        self._names.append(name)
        self._clients.append(dict(fields))
        return True

    def finish(
        self, *, field_scales: Mapping[str, float] | None = None, sort_by_name: bool = True
    ) -> FederatedData:
        """The kept clients as one FederatedData; warns once about dropped ones.

        Args:
          field_scales: see :class:`~fedjaxsim.data.federated.FederatedData`.
          sort_by_name: order clients by id, so that every file format holding
            the same clients gives the same population.

        Raises:
          ValueError: no client was kept.
        """
        total = len(self._names) + sum(self._dropped.values())
        if self._dropped:
            details = ", ".join(
                f"{count} {kind} (first {self._first_dropped[kind]!r})"
                for kind, count in sorted(self._dropped.items())
            )
            warnings.warn(
                f"{self.source}: dropped {sum(self._dropped.values())} of {total} clients "
                f"(drop_invalid=True): {details}",
                DroppedClientsWarning,
                stacklevel=3,
            )
        if not self._names:
            raise ValueError(f"{self.source}: no valid clients (read {total})")
        order = range(len(self._names))
        if sort_by_name:
            order = sorted(order, key=self._names.__getitem__)
        return FederatedData.from_clients(
            [self._clients[i] for i in order], [self._names[i] for i in order], field_scales
        )


def validate_federated_data(
    data: FederatedData,
    *,
    num_classes: int | None,
    label_field: str = "y",
    drop_invalid: bool = False,
    source: str = "dataset",
) -> FederatedData:
    """Checks a whole population at once (vectorized) and drops or raises.

    Checks empty clients, non-finite values in floating fields and labels
    outside ``[0, num_classes)``. Length mismatches cannot occur inside a
    FederatedData (all fields share the offsets).

    Returns:
      ``data`` itself when every client is valid, else the valid clients (with
      a :class:`DroppedClientsWarning`) when ``drop_invalid``.

    Raises:
      ValueError: an invalid client and ``drop_invalid`` is False, naming it.
    """
    offsets = np.asarray(data.offsets)
    reasons: dict[int, str] = {}
    for index in np.flatnonzero(data.num_examples == 0):
        reasons.setdefault(int(index), "has no examples")

    def mark(bad_rows: np.ndarray, reason: str) -> None:
        owners = np.searchsorted(offsets, bad_rows, side="right") - 1
        for index in np.unique(owners):
            reasons.setdefault(int(index), reason)

    for name, array in data.fields.items():
        if np.issubdtype(array.dtype, np.floating):
            finite = np.isfinite(array).reshape(len(array), -1).all(axis=1)
            mark(np.flatnonzero(~finite), f"has NaN or Inf values in field {name!r}")
    if label_field in data.fields and num_classes is not None:
        labels = np.asarray(data.fields[label_field])
        mark(
            np.flatnonzero((labels < 0) | (labels >= num_classes)),
            f"has labels outside [0, {num_classes}) in field {label_field!r}",
        )
    if not reasons:
        return data

    def label(index: int) -> str:
        return repr(data.client_names[index]) if data.client_names is not None else str(index)

    if not drop_invalid:
        first = min(reasons)
        raise ValueError(
            f"{source}: client {label(first)} {reasons[first]} ({len(reasons)} invalid clients in "
            "all). Fix the data, or pass drop_invalid=True to drop them with a warning."
        )
    counts = collections.Counter(reasons.values())
    warnings.warn(
        f"{source}: dropped {len(reasons)} of {data.num_clients} clients (drop_invalid=True): "
        + "; ".join(f"{count} client(s) {reason}" for reason, count in sorted(counts.items())),
        DroppedClientsWarning,
        stacklevel=2,
    )
    keep = [i for i in range(data.num_clients) if i not in reasons]
    if not keep:
        raise ValueError(f"{source}: no valid clients among {data.num_clients}")
    return data.select(keep)
