"""``fedjaxsim data inspect``: a picture and a summary of a federated dataset.

The picture has three panels: the histogram of client sizes, the label
distribution of a sample of clients as a heatmap (one row per client, the
share of each class), and, for image data, sample inputs of three clients.
The summary measures how federated the data is:

* quantity skew: the coefficient of variation of client sizes (0 when every
  client holds as many examples) and the share of the examples held by the
  largest tenth of the clients;
* label skew: the mean total-variation distance between each client's label
  distribution and the pooled one (0 for IID clients, near 1 when every
  client holds one class), and the mean number of classes per client.

For next-token data a "label" is a target token (padding left out), so the
label skew is the skew of the clients' token distributions; for tag data it
is their tags. Quantity is always counted in examples. A population of more
than :data:`MAX_CLIENTS` clients (Stack Overflow has 342,477, each with a
10,004-word histogram), or more than fit :data:`COUNT_BYTES` of histograms
(a GPT-2 vocabulary has 50,257 tokens), is summarised over a seeded sample
of that many, reported as ``clients_summarized``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HEATMAP_CLIENTS = 30  # rows of the label heatmap
MAX_CLIENTS = 5_000  # clients whose label histograms are summarised
COUNT_BYTES = 256 * 2**20  # memory for the clients' int64 label histograms
SAMPLE_CLIENTS, SAMPLES_PER_CLIENT = 3, 6


def summarized_clients(data, seed: int = 0, num_classes: int = 0) -> np.ndarray:
    """The clients the summary covers: all, or a seeded sample of at most
    :data:`MAX_CLIENTS` whose ``num_classes``-wide histograms fit :data:`COUNT_BYTES`."""
    limit = min(MAX_CLIENTS, max(1, COUNT_BYTES // (8 * max(num_classes, 1))))
    if data.num_clients <= limit:
        return np.arange(data.num_clients)
    rng = np.random.default_rng([seed, 0x1A5])
    return np.sort(rng.choice(data.num_clients, limit, replace=False))


def label_counts(data, num_classes: int, task=None, clients=None) -> np.ndarray:
    """int64[len(clients), num_classes]: each client's labels per class.

    Args:
      data: the split.
      num_classes: classes (vocabulary or tags).
      task: next-token data leaves out its padding targets; None is classification.
      clients: which clients (default all).
    """
    clients = np.arange(data.num_clients) if clients is None else clients
    counts = np.zeros((len(clients), num_classes), np.int64)
    for row, client in enumerate(clients):
        labels = np.asarray(data.client(int(client), decode=False)["y"]).reshape(-1)
        if task is not None and task.kind == "next_token":
            labels = labels[labels != task.pad_id]
        labels = labels[labels < num_classes]  # a tag slot holding num_classes is empty
        counts[row] = np.bincount(labels, minlength=num_classes)[:num_classes]
    return counts


def summarize(dataset, counts: np.ndarray, clients=None) -> dict:
    """The dataset's size and its quantity and label skew (module doc)."""
    examples = np.asarray(dataset.train.num_examples)
    sizes = examples if clients is None else examples[clients]
    shares = counts / np.maximum(counts.sum(axis=1), 1)[:, None]
    pooled = counts.sum(axis=0) / max(counts.sum(), 1)
    largest = np.sort(sizes)[::-1][: max(1, len(sizes) // 10)]
    return {
        "name": dataset.name,
        "clients": int(dataset.train.num_clients),
        "clients_summarized": int(len(sizes)),
        "examples": int(sizes.sum()) if clients is None else int(examples.sum()),
        "test_examples": int(dataset.test.total_examples),
        "classes": int(dataset.num_classes),
        "input_shape": list(dataset.input_shape),
        "client_size_min": int(sizes.min()),
        "client_size_median": float(np.median(sizes)),
        "client_size_max": int(sizes.max()),
        "client_size_cv": float(sizes.std() / sizes.mean()),
        "largest_tenth_share": float(largest.sum() / sizes.sum()),
        "label_tv_distance_mean": float(0.5 * np.abs(shares - pooled).sum(axis=1).mean()),
        "classes_per_client_mean": float((counts > 0).sum(axis=1).mean()),
    }


def _is_image(dataset) -> bool:
    shape = tuple(dataset.input_shape)
    return len(shape) == 3 and shape[2] in (1, 3)


def build_inspection_figure(dataset, counts: np.ndarray, seed: int = 0, clients=None):
    """The figure of the module doc; the heatmap's clients are a seeded sample."""
    clients = np.arange(len(counts)) if clients is None else np.asarray(clients)
    sizes = np.asarray(dataset.train.num_examples)[clients]
    from matplotlib.figure import Figure  # outside pyplot: the caller's backend is kept

    image = _is_image(dataset)
    figure = Figure(figsize=(14, 9 if image else 4.5))
    grid = figure.add_gridspec(2 if image else 1, 2)
    sizes_axis = figure.add_subplot(grid[0, 0])
    sizes_axis.hist(sizes, bins=min(50, max(5, len(counts) // 5)))
    sizes_axis.set_xlabel("examples per client")
    sizes_axis.set_ylabel("clients")
    sizes_axis.set_title(f"client sizes ({len(counts)} clients)")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(counts), min(HEATMAP_CLIENTS, len(counts)), replace=False))
    shares = counts[rows] / np.maximum(counts[rows].sum(axis=1), 1)[:, None]
    names = clients[rows]
    heatmap_axis = figure.add_subplot(grid[0, 1])
    shown = heatmap_axis.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    heatmap_axis.set_xlabel("class")
    heatmap_axis.set_ylabel("client (sample)")
    heatmap_axis.set_yticks(range(len(rows)), [str(r) for r in names], fontsize="x-small")
    heatmap_axis.set_title("label distribution per client")
    figure.colorbar(shown, ax=heatmap_axis, label="share of the client's examples")
    if image:
        _draw_samples(figure, grid[1, :], dataset, names[:SAMPLE_CLIENTS])
    figure.tight_layout()
    return figure


def _draw_samples(figure, cell, dataset, clients) -> None:
    inner = cell.subgridspec(len(clients), SAMPLES_PER_CLIENT)
    for row, client in enumerate(clients):
        examples = dataset.train.client(int(client))
        for column in range(min(SAMPLES_PER_CLIENT, len(examples["y"]))):
            axis = figure.add_subplot(inner[row, column])
            picture = np.asarray(examples["x"][column], np.float32)
            gray = picture.shape[-1] == 1
            shown = picture[..., 0] if gray else np.clip(picture, 0, 1)
            axis.imshow(shown, cmap="gray" if gray else None, vmin=0, vmax=1)
            axis.set_title(f"client {client}: {int(examples['y'][column])}", fontsize="x-small")
            axis.axis("off")


def inspect_dataset(dataset, output: str | Path, seed: int = 0) -> dict:
    """Writes the picture to ``output`` (atomically) and returns the summary."""
    from fedjaxsim.runner.plot import save_figure

    clients = summarized_clients(dataset.train, seed, dataset.num_classes)
    counts = label_counts(dataset.train, dataset.num_classes, dataset.task, clients)
    summary = summarize(dataset, counts, clients)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_figure(build_inspection_figure(dataset, counts, seed, clients), output)
    return summary
