"""Fixtures shared by the data tests: a tiny byte-level BPE tokenizer."""

import pytest

from fedjaxsim.data import text
from tests.data.benchmark_files import write_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
    """A tokenizer.json with the end-of-text token, written once per session."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return text.load_tokenizer(tokenizer_path)
