"""The README's Layout section names every package folder, and only folders that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def test_layout_names_exactly_the_package_folders():
    named = set(re.findall(r"(fedjaxsim/[\w/]+?)/?\s", _layout_block()))
    packages = {
        str(path.parent.relative_to(ROOT))
        for path in (ROOT / "fedjaxsim").rglob("*/__init__.py")
    }
    folders = {name.rstrip("/") for name in named if (ROOT / name).is_dir()}
    assert folders == packages
    for name in named:
        assert (ROOT / name).exists() or (ROOT / f"{name}.py").exists(), name
    for folder in ("configs", "benchmarks", "scripts", "tests"):
        assert f"{folder}/" in _layout_block() and (ROOT / folder).is_dir()
