"""`fedjaxsim predict`, `fedjaxsim evaluate` and `fedjaxsim data inspect` on real runs and data."""

import json
import struct

import numpy as np
import pytest

from fedjaxsim.data.federated import FederatedData, FederatedDataset
from fedjaxsim.runner.cli import main
from fedjaxsim.runner.config import load_config
from fedjaxsim.runner.inspect_data import COUNT_BYTES, label_counts, summarize, summarized_clients


@pytest.fixture(scope="module")
def held_out(tiny_run):
    """The run's held-out digits, as the runner evaluated them."""
    config_path, _ = tiny_run
    config = load_config(config_path)
    test = config.data.load(config.seed, progress=False).test.all_examples()
    return test["x"], test["y"]


def _save_pngs(folder, images):
    from PIL import Image

    paths = []
    for index, image in enumerate(images):
        path = folder / f"digit_{index}.png"
        Image.fromarray(np.rint(image[..., 0] * 255).astype(np.uint8), mode="L").save(path)
        paths.append(str(path))
    return paths


def _predictions(capsys, arguments):
    assert main(["predict", *arguments, "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_predict_on_held_out_digits_saved_as_png_matches_the_runs_evaluation(
    tiny_run, held_out, tmp_path, capsys
):
    _, run = tiny_run
    images, labels = held_out
    from_png = _predictions(capsys, [str(run), *_save_pngs(tmp_path, images)])
    assert len(from_png) == len(labels)
    # The run's own, in-memory evaluation of the same model on the same digits.
    summary = json.loads((run / "summary.json").read_text())
    correct = sum(p["class"] == y for p, y in zip(from_png, labels))
    assert correct / len(labels) == pytest.approx(summary["final_test_accuracy"], abs=1e-7)
    # The PNGs read back exactly: the same labels and probabilities as the arrays.
    np.save(tmp_path / "batch.npy", images)
    from_array = _predictions(capsys, [str(run), str(tmp_path / "batch.npy")])
    assert [p["class"] for p in from_array] == [p["class"] for p in from_png]
    assert [p["probabilities"] for p in from_array] == [p["probabilities"] for p in from_png]
    assert from_array[3]["input"] == f"{tmp_path / 'batch.npy'}[3]"
    for record in from_png:
        assert record["probability"] == max(record["probabilities"])
        assert sum(record["probabilities"]) == pytest.approx(1.0, abs=1e-5)


def test_predict_prints_a_line_per_input_and_inverts_on_request(
    tiny_run, held_out, tmp_path, capsys
):
    from PIL import Image

    _, run = tiny_run
    images, _ = held_out
    # Dark ink on white, 4x larger, RGB: --invert and resizing bring it to the model's input.
    paper = np.rint((1.0 - images[0][..., 0]) * 255).astype(np.uint8)
    big = Image.fromarray(paper, mode="L").resize((32, 32), Image.Resampling.NEAREST)
    big.convert("RGB").save(tmp_path / "paper.png")
    np.save(tmp_path / "one.npy", images[0][..., 0])  # one input, channel left out
    assert main(["predict", str(run), str(tmp_path / "one.npy")]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{tmp_path / 'one.npy'}: class ")
    (inverted,) = _predictions(capsys, [str(run), str(tmp_path / "paper.png"), "--invert"])
    assert f"class {inverted['class']} " in line


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("garbage.png", b"not an image at all", "cannot be decoded as an image"),
        (
            "wrong.npy",
            np.zeros((5, 7, 7, 1), np.float32),
            "does not fit the model's input (8, 8, 1)",
        ),
        ("notes.txt", b"7", "unknown input type '.txt'"),
        ("missing.png", None, "no such file"),
    ],
)
def test_bad_inputs_are_named_and_nothing_is_written(
    tiny_run, tmp_path, capsys, name, content, fragment
):
    _, run = tiny_run
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["predict", str(run), str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), str(tmp_path / "x.npy")]) == 2
    assert "has no checkpoint; train first" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nowhere").exists()


def test_evaluate_reproduces_the_runs_final_evaluation(tiny_run, capsys):
    _, run = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    assert main(["evaluate", str(run), "--per-client", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["round"], result["split"]) == (10, "test")
    assert result["accuracy"] == summary["final_test_accuracy"]
    assert result["loss"] == summary["final_test_loss"]
    assert result["client_accuracy_mean"] == summary["final_client_accuracy_mean"]
    assert main(["evaluate", str(run), "--split", "train"]) == 0
    out = capsys.readouterr().out
    assert "split=train" in out and "examples=1438" in out


def _dataset(client_labels, num_classes=3):
    clients = [
        {"x": np.zeros((len(y), 4), np.float32), "y": np.asarray(y, np.int32)}
        for y in client_labels
    ]
    train = FederatedData.from_clients(clients)
    test = FederatedData.from_clients(clients[:1])
    return FederatedDataset("toy", train, test, num_classes=num_classes, input_shape=(4,))


def test_skew_measures_have_their_closed_forms():
    one_class_each = _dataset([[0, 0], [1, 1], [2, 2, 2, 2]])
    summary = summarize(one_class_each, label_counts(one_class_each.train, 3))
    # pooled shares (1/4, 1/4, 1/2): TV distances 3/4, 3/4, 1/2.
    assert summary["label_tv_distance_mean"] == pytest.approx(2 / 3)
    assert summary["classes_per_client_mean"] == 1.0
    sizes = np.array([2, 2, 4])
    assert summary["client_size_cv"] == pytest.approx(sizes.std() / sizes.mean())
    assert summary["largest_tenth_share"] == pytest.approx(0.5)
    iid = _dataset([[0, 1, 2], [2, 1, 0]])
    summary = summarize(iid, label_counts(iid.train, 3))
    assert (summary["label_tv_distance_mean"], summary["client_size_cv"]) == (0.0, 0.0)
    assert (summary["clients"], summary["examples"], summary["classes"]) == (2, 6, 3)


def test_the_summarized_sample_keeps_histograms_of_a_large_vocabulary_within_budget():
    class Split:
        num_clients = 342_477

    vocabulary = 50_257  # GPT-2's
    sample = summarized_clients(Split(), seed=0, num_classes=vocabulary)
    assert len(sample) * vocabulary * 8 <= COUNT_BYTES
    assert len(np.unique(sample)) == len(sample) > 100
    assert len(summarized_clients(Split(), seed=0, num_classes=62)) == 5_000


def test_data_inspect_writes_a_png_and_prints_the_summary(tmp_path, capsys):
    output = tmp_path / "pictures" / "digits.png"
    arguments = ["data", "inspect", "--dataset", "digits", "--data.num-clients", "20"]
    assert main([*arguments, "--output", str(output), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["clients"], summary["examples"], summary["classes"]) == (20, 1438, 10)
    assert summary["input_shape"] == [8, 8, 1]
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1400, 900)  # with the sample-image row
    bad = tmp_path / "bad.png"
    assert main(["data", "inspect", "--dataset", "nope", "--output", str(bad)]) == 2
    assert "nope" in capsys.readouterr().err
    assert not bad.exists()


def _documented_commands(program: str) -> list[list[str]]:
    """The ``fedjaxsim <program>`` lines of docs/cli.md's bash blocks, after the program name."""
    import re
    import shlex
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL):
        lines += [shlex.split(line)[1:] for line in block.splitlines()]
    return [line for line in lines if line[:1] == [program] or line[:2] == program.split()]


def test_the_documented_predict_evaluate_and_inspect_lines_run(
    tiny_run, held_out, tmp_path, monkeypatch, capsys
):
    from PIL import Image

    _, run = tiny_run
    images, _ = held_out
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "digits-fedavg").symlink_to(run)
    gray = np.rint(images[0][..., 0] * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save("seven.png")
    Image.fromarray(gray, mode="L").convert("RGB").save("eight.jpg")
    np.save("batch.npy", images[:4])
    commands = {
        name: _documented_commands(name) for name in ("predict", "evaluate", "data inspect")
    }
    assert all(commands.values()), commands
    for command in [c for group in commands.values() for c in group]:
        capsys.readouterr()
        assert main(command) == 0, command
        assert capsys.readouterr().out.strip(), command
    for (command,) in [commands["data inspect"]]:
        output = command[command.index("--output") + 1]
        assert (tmp_path / output).read_bytes()[:4] == b"\x89PNG"
