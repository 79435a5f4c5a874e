"""Sphinx configuration of the fedjaxsim docs site.

Build it with ``pip install -e ".[docs]" && sphinx-build docs docs/_build/html``
(``tests/docs/test_docs_build.py`` builds it with ``-W --keep-going``, so any
warning fails the suite). Pages are MyST Markdown (``.md``) and notebooks
(``.ipynb``), both read by myst-nb; the API pages are generated from the
package's Google-style docstrings by autodoc and napoleon.
"""

from __future__ import annotations

import inspect
import logging
import sys
from pathlib import Path

from docutils import nodes
from sphinx import addnodes
from sphinx.ext import napoleon
from sphinx.util import logging as sphinx_logging

ROOT = Path(__file__).resolve().parents[1]
# The package is normally installed (``pip install -e .``); this makes a plain
# checkout build too.
sys.path.insert(0, str(ROOT))

project = "fedjaxsim"
author = "the fedjaxsim authors"
copyright = "the fedjaxsim authors"  # noqa: A001 (Sphinx's name for it)

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]

# myst-nb reads Markdown pages and notebooks; nothing else is a source.
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# The notebooks are executed by the test suite (tests/docs/test_notebooks.py),
# in a fresh kernel each, and stored stripped; the site shows their source.
nb_execution_mode = "off"

myst_enable_extensions = ["colon_fence", "dollarmath"]
# Anchors for headings down to ###, so pages can link to a section
# (``[packing](concepts/packing.md#buckets)``).
myst_heading_anchors = 3

# The API reference: Google-style docstrings ("Args:", "Returns:", "Raises:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"

html_theme = "furo"
html_title = "fedjaxsim"


def _skip_namedtuple_field_aliases(app, what, name, obj, skip, options):
    """Leaves out the fields of NamedTuples, which autodoc would list one by one.

    Python documents each field as "Alias for field number N"; the fields are
    in the class signature already, and a class that describes them does so in
    its docstring's "Attributes:" section (which, listed again by autodoc,
    would be a duplicate object description).
    """
    del app, name, skip, options
    if what == "class" and (getattr(obj, "__doc__", None) or "").startswith(
        "Alias for field number"
    ):
        return True
    return None


def _skip_function_aliases(app, what, name, obj, skip, options):
    """Leaves out class attributes that hold a function defined elsewhere.

    The runner's algorithm configs hold their builder as a class attribute
    (``builder = staticmethod(scaffold)``); autodoc would repeat the
    builder's whole docstring in every config class. A function defined in
    a class body has a dotted ``__qualname__``; an alias does not.
    """
    del app, name, skip, options
    function = getattr(obj, "__func__", obj)
    if what == "class" and inspect.isfunction(function) and "." not in function.__qualname__:
        return True
    return None


def _napoleon_except_attributes(app, what, name, obj, options, lines):
    """Napoleon for every docstring except those of attributes and module data.

    Napoleon reads the first line of an attribute's docstring as Google's
    inline ``type: description`` form, so the config dataclasses' field
    docstrings ("Output folder: config.yaml, metrics.jsonl, ...", also
    the ``--help`` text of ``fedjaxsim run``) would render "Output folder" as
    a type. Attribute types here come from annotations, never from that form,
    so those docstrings are left as written. Properties keep the inline form
    (``int64[num_clients]: ...``).
    """
    if what in ("attribute", "data"):
        return
    napoleon._process_docstring(app, what, name, obj, options, lines)


def _without_annotated_metadata(text: str) -> str:
    """``Annotated[T, metadata...]`` -> ``T``, for every occurrence in ``text``."""
    marker = "Annotated["
    while (start := text.find(marker)) >= 0:
        depth, first_end, index = 0, None, start + len(marker)
        while index < len(text):
            char = text[index]
            if char in "[(":
                depth += 1
            elif char in ")]":
                if depth == 0:
                    break
                depth -= 1
            elif char == "," and depth == 0 and first_end is None:
                first_end = index
            index += 1
        inner = text[start + len(marker) : first_end if first_end is not None else index]
        text = text[:start] + inner.strip() + text[index + 1 :]
    return text


def _simplify_annotated_signatures(app, what, name, obj, options, signature, return_annotation):
    """Shows ``Annotated[int, tyro.conf.arg(...)]`` as ``int`` in signatures.

    The runner's config dataclasses annotate their fields with tyro's
    command-line metadata (aliases, help); the type is what a reader needs.
    """
    del app, what, name, obj, options
    if signature and "Annotated[" in signature:
        signature = _without_annotated_metadata(signature)
    if return_annotation and "Annotated[" in return_annotation:
        return_annotation = _without_annotated_metadata(return_annotation)
    return signature, return_annotation


def _simplify_annotated_attribute_types(app, doctree):
    """The same for the ``: type`` of attributes (the config dataclasses' fields)."""
    del app
    for annotation in doctree.findall(addnodes.desc_annotation):
        text = annotation.astext()
        if "Annotated[" not in text or not text.lstrip().startswith(":"):
            continue
        simplified = _without_annotated_metadata(text.lstrip()[1:].strip())
        annotation.children = []
        annotation += addnodes.desc_sig_punctuation("", ":")
        annotation += addnodes.desc_sig_space()
        annotation += nodes.Text(simplified)


class _AllowEmptyTutorialsGlob(logging.Filter):
    """Lets the tutorials' glob toctree match no notebook (one warning, one page).

    ``tutorials/index.md`` lists the notebooks of its folder with a ``*``
    glob, so a new notebook needs no edit there. Sphinx warns when a glob
    matches nothing, and that warning has no type, so ``suppress_warnings``
    cannot name it; this filter drops exactly that message for that page, so
    the site still builds with ``-W`` while the folder holds no notebook.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        location = getattr(record, "location", None)
        source = str(getattr(location, "source", None) or location or "")
        return not (
            str(record.msg).startswith("toctree glob pattern")
            and "didn't match any documents" in str(record.msg)
            and Path(source.split(":")[0]).as_posix().endswith("tutorials/index.md")
        )


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_field_aliases)
    app.connect("autodoc-skip-member", _skip_function_aliases)
    app.connect("autodoc-process-signature", _simplify_annotated_signatures)
    app.connect("doctree-read", _simplify_annotated_attribute_types)
    sphinx_logging.getLogger("sphinx.directives.other").logger.addFilter(_AllowEmptyTutorialsGlob())
    # Replace napoleon's docstring handler (``_process_docstring``, connected
    # when the extension loaded, before this setup runs) with the wrapper above.
    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", _napoleon_except_attributes)
