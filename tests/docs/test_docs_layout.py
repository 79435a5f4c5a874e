"""The API reference's Layout section names every package folder, and only those that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "api" / "index.md"


def _layout_block() -> str:
    section = PAGE.read_text().split("## Layout", 1)[1]
    return re.search(r"```\n(.*?)```", section, flags=re.S).group(1)


def test_layout_names_exactly_the_package_folders():
    named = set(re.findall(r"(fedjaxsim/[\w/]+?)/?\s", _layout_block()))
    packages = {
        str(path.parent.relative_to(ROOT)) for path in (ROOT / "fedjaxsim").rglob("*/__init__.py")
    }
    folders = {name.rstrip("/") for name in named if (ROOT / name).is_dir()}
    assert folders == packages
    for name in named:
        assert (ROOT / name).exists() or (ROOT / f"{name}.py").exists(), name
    for folder in ("configs", "benchmarks", "scripts", "tests"):
        assert f"{folder}/" in _layout_block() and (ROOT / folder).is_dir()


def test_every_package_has_an_api_page():
    # Each package folder of the layout is documented: its API page holds an
    # automodule of the package or of its modules.
    pages = "\n".join(path.read_text() for path in (ROOT / "docs" / "api").glob("*.md"))
    for path in (ROOT / "fedjaxsim").rglob("*/__init__.py"):
        package = ".".join(path.parent.relative_to(ROOT).parts)
        assert re.search(rf"automodule:: {re.escape(package)}(\.\w+)*\s", pages), package


def test_top_level_page_links_every_export_to_its_definition():
    import importlib

    import fedjaxsim

    text = (ROOT / "docs" / "api" / "fedjaxsim.md").read_text()
    targets = re.findall(r"\{py:(?:func|class)\}`~?([\w.]+)`", text)
    by_name = {target.rsplit(".", 1)[1]: target for target in targets}
    assert sorted(by_name) == sorted(fedjaxsim.__all__)
    for name, target in by_name.items():
        module, attribute = target.rsplit(".", 1)
        # The link goes where the object is defined, which is where autodoc documents it.
        assert getattr(importlib.import_module(module), attribute) is getattr(fedjaxsim, name)
        assert getattr(fedjaxsim, name).__module__ == module, target
