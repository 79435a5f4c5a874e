"""Tokenized text: local tokenizer.json files, packing, prompt masks, Shakespeare re-tokenized."""

from pathlib import Path

import numpy as np
import pytest

from fedjaxsim.data import text
from fedjaxsim.data.shakespeare import (
    read_fedjax_shakespeare,
    read_leaf_shakespeare,
    read_tff_shakespeare,
    tokenize_snippets,
)
from tests.data.benchmark_files import (
    EOS_TOKEN,
    long_text_roles,
    make_roles,
    write_fedjax_shakespeare,
    write_leaf_shakespeare,
    write_tff_shakespeare_h5,
    write_tiny_tokenizer,
)

TINY_GPT2 = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_gpt2" / "tokenizer.json"


# ----------------------------------------------------------------------------- packing


def test_pack_documents_matches_a_hand_written_example():
    # Documents [5, 6, EOS] and [7, EOS] with EOS = 0, the stream starting
    # with EOS: every document token is a target; the last row is padded with
    # the end-of-text id (inputs) and the vocabulary size 9 (targets).
    packed = text.pack_documents([[5, 6, 0], [7, 0]], 4, pad_id=9, input_pad_id=0, start_id=0)
    np.testing.assert_array_equal(packed["x"], [[0, 5, 6, 0], [7, 0, 0, 0]])
    np.testing.assert_array_equal(packed["y"], [[5, 6, 0, 7], [0, 9, 9, 9]])
    assert packed["x"].dtype == packed["y"].dtype == np.int32
    # Without a start token the first token is only an input; 4 targets fill one row.
    packed = text.pack_documents([[5, 6, 0], [7, 0]], 4, pad_id=9, input_pad_id=8)
    np.testing.assert_array_equal(packed["x"], [[5, 6, 0, 7]])
    np.testing.assert_array_equal(packed["y"], [[6, 0, 7, 0]])
    # A document longer than a row continues on the next one.
    packed = text.pack_documents([[1, 2, 3, 4, 5, 0]], 2, pad_id=9, input_pad_id=0)
    np.testing.assert_array_equal(packed["x"], [[1, 2], [3, 4], [5, 0]])
    np.testing.assert_array_equal(packed["y"], [[2, 3], [4, 5], [0, 9]])


def test_pack_documents_without_targets_gives_no_rows():
    for documents in ([], [[3]], [[]]):
        packed = text.pack_documents(documents, 5, pad_id=9, input_pad_id=0)
        assert packed["x"].shape == packed["y"].shape == (0, 5)
    with pytest.raises(ValueError, match="sequence_length must be at least 1, got 0"):
        text.pack_documents([[1, 2]], 0, pad_id=9, input_pad_id=0)
    with pytest.raises(ValueError, match="pad_id must be a non-negative integer"):
        text.pack_documents([[1, 2]], 4, pad_id=-1, input_pad_id=0)


def test_pad_examples_masks_the_prompt_targets():
    prompts = [[1, 2], [3], [1, 2, 3], [1, 1, 1, 1, 1]]
    responses = [[4, 0], [5, 6, 7, 0], [4, 5, 6, 0], [4, 0]]
    fields, truncated = text.pad_examples(prompts, responses, 4, pad_id=9, input_pad_id=0)
    np.testing.assert_array_equal(
        fields["x"], [[1, 2, 4, 0], [3, 5, 6, 7], [1, 2, 3, 4], [1, 1, 1, 1]]
    )
    # The first response token is the target of the last prompt token; EOS is a target.
    np.testing.assert_array_equal(
        fields["y"], [[9, 4, 0, 9], [5, 6, 7, 0], [9, 9, 4, 5], [9, 9, 9, 9]]
    )
    np.testing.assert_array_equal(truncated, [False, False, True, True])
    fields, _ = text.pad_examples(
        prompts, responses, 4, pad_id=9, input_pad_id=0, train_on_prompt=True
    )
    np.testing.assert_array_equal(
        fields["y"], [[2, 4, 0, 9], [5, 6, 7, 0], [2, 3, 4, 5], [1, 1, 1, 1]]
    )
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        text.pad_examples([[1], [2]], [[3]], 4, pad_id=9, input_pad_id=0)


def test_real_targets_leave_out_padding_only():
    np.testing.assert_array_equal(text.real_targets([[9, 0, 4], [5, 9, 9]], 9), [0, 4, 5])


# ----------------------------------------------------------------------------- tokenizers


def test_load_tokenizer_from_a_file_or_a_folder(tokenizer_path, tokenizer):
    from_folder = text.load_tokenizer(tokenizer_path.parent)
    assert text.tokenizer_digest(from_folder) == text.tokenizer_digest(tokenizer)
    assert text.vocab_size(tokenizer) == 320
    assert text.eos_id(tokenizer) == tokenizer.token_to_id(EOS_TOKEN)
    assert text.input_pad_id(tokenizer) == text.eos_id(tokenizer)
    task = text.next_token_task(tokenizer)
    assert (task.kind, task.pad_id, task.excluded_ids) == ("next_token", 320, ())
    assert text.as_tokenizer(tokenizer) is tokenizer
    assert text.text_store_suffix(tokenizer, 64).endswith("_seq64")


def test_the_digest_names_the_tokenizer(tmp_path, tokenizer):
    other = text.load_tokenizer(write_tiny_tokenizer(tmp_path / "other.json", vocab_size=300))
    digest = text.tokenizer_digest(tokenizer)
    assert len(digest) == 64 and text.tokenizer_digest(other) != digest
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_text(tokenizer.to_str(pretty=True))  # another layout of the same JSON
    assert text.tokenizer_digest(text.load_tokenizer(copy)) == digest


def test_missing_and_corrupt_tokenizer_files_are_clear_errors(tmp_path, tokenizer_path):
    with pytest.raises(
        FileNotFoundError, match="missing.json does not exist.*tokenizer.json.*Noth"
    ):
        text.load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match=r"empty_folder/tokenizer.json does not exist"):
        (tmp_path / "empty_folder").mkdir()
        text.load_tokenizer(tmp_path / "empty_folder")
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(tokenizer_path.read_text()[:200])
    with pytest.raises(ValueError, match="corrupt.json is not a valid Hugging Face tokenizer.json"):
        text.load_tokenizer(corrupt)


def test_a_tokenizer_without_the_end_of_text_token_is_refused(tmp_path, tokenizer):
    bare = text.load_tokenizer(
        write_tiny_tokenizer(tmp_path / "bare.json", special_tokens=["</s>"])
    )
    with pytest.raises(ValueError, match=r"no end-of-text token '<\|endoftext\|>'.*'</s>'"):
        text.eos_id(bare)
    assert text.eos_id(bare, "</s>") == 0
    assert text.input_pad_id(bare) == 0  # no such token: pad inputs with 0


def test_special_token_text_in_data_is_not_a_special_token(tokenizer):
    (ids,) = text.encode_texts(tokenizer, [f"to be{EOS_TOKEN}or"])
    assert text.eos_id(tokenizer) not in ids
    assert tokenizer.decode(ids) == f"to be{EOS_TOKEN}or"
    assert tokenizer.encode_special_tokens is False  # the switch is restored
    assert text.encode_texts(tokenizer, []) == []


@pytest.mark.skipif(not TINY_GPT2.is_file(), reason="tests/fixtures/tiny_gpt2 not present")
def test_the_tiny_gpt2_fixture_tokenizer_loads():
    tokenizer = text.load_tokenizer(TINY_GPT2.parent)
    assert text.eos_id(tokenizer) < text.vocab_size(tokenizer)


# ----------------------------------------------------------------------------- Shakespeare


def _role_text(snippets):
    """What the real targets of a role decode to: every non-empty snippet, then EOS."""
    return "".join(s.decode("utf-8") + EOS_TOKEN for s in snippets if s)


def _check_round_trip(data, roles, tokenizer, sequence_length):
    pad_id = text.vocab_size(tokenizer)
    eos = text.eos_id(tokenizer)
    assert list(data.client_names) == sorted(roles)
    for index, name in enumerate(data.client_names):
        client = data.client(index)
        assert client["x"].shape[1:] == (sequence_length,)
        targets = text.real_targets(client["y"], pad_id)
        assert tokenizer.decode(targets.tolist(), skip_special_tokens=False) == _role_text(
            roles[name]
        )
        # Inputs are the targets shifted by one, the stream starting with EOS.
        inputs = client["x"].reshape(-1)[: len(targets)]
        np.testing.assert_array_equal(inputs, np.concatenate([[eos], targets[:-1]]))
        assert np.all(client["x"].reshape(-1)[len(targets) :] == eos)  # padded inputs
        assert client["y"].max() <= pad_id


@pytest.mark.parametrize("sequence_length", [1, 7, 32])
def test_tff_and_fedjax_roles_are_re_tokenized_losslessly(
    tmp_path, tokenizer, tokenizer_path, sequence_length
):
    roles = make_roles(sizes=(2, 1, 3, 4))  # with an empty snippet and non-ASCII text
    write_tff_shakespeare_h5(tmp_path / "s.h5", roles)
    write_fedjax_shakespeare(tmp_path / "s.sqlite", roles)
    tff = read_tff_shakespeare(
        tmp_path / "s.h5", sequence_length=sequence_length, tokenizer=tokenizer_path
    )
    fedjax = read_fedjax_shakespeare(
        tmp_path / "s.sqlite", sequence_length=sequence_length, tokenizer=tokenizer
    )
    _check_round_trip(tff, roles, tokenizer, sequence_length)
    for name in ("x", "y"):
        np.testing.assert_array_equal(fedjax.fields[name], tff.fields[name])
    np.testing.assert_array_equal(fedjax.offsets, tff.offsets)


def test_leaf_text_is_re_tokenized_like_the_same_single_snippets(tmp_path, tokenizer):
    roles = long_text_roles()
    write_tff_shakespeare_h5(tmp_path / "s.h5", roles)
    texts = {name: snippets[0].decode("ascii") for name, snippets in roles.items()}
    write_leaf_shakespeare(tmp_path / "leaf", texts)
    leaf = read_leaf_shakespeare(tmp_path / "leaf", sequence_length=16, tokenizer=tokenizer)
    tff = read_tff_shakespeare(tmp_path / "s.h5", sequence_length=16, tokenizer=tokenizer)
    _check_round_trip(leaf, roles, tokenizer, 16)
    np.testing.assert_array_equal(leaf.fields["y"], tff.fields["y"])


def test_tokenize_snippets_by_hand(tokenizer):
    eos, pad_id = text.eos_id(tokenizer), text.vocab_size(tokenizer)
    first = tokenizer.encode("To be", add_special_tokens=False).ids
    second = tokenizer.encode("or not", add_special_tokens=False).ids
    stream = [eos, *first, eos, *second, eos]
    rows = -(-(len(stream) - 1) // 4)
    x = np.full(rows * 4, eos)
    y = np.full(rows * 4, pad_id)
    x[: len(stream) - 1], y[: len(stream) - 1] = stream[:-1], stream[1:]
    packed = tokenize_snippets([b"To be", b"", b"or not"], tokenizer, 4)
    np.testing.assert_array_equal(packed["x"], x.reshape(rows, 4))
    np.testing.assert_array_equal(packed["y"], y.reshape(rows, 4))


def test_bad_snippets_and_tokenizers_name_the_file(tmp_path, tokenizer, tokenizer_path):
    roles = {**make_roles(sizes=(2,)), "LATIN_1_ROLE": [b"caf\xe9"]}
    write_tff_shakespeare_h5(tmp_path / "latin.h5", roles)
    with pytest.raises(
        ValueError, match="latin.h5: client 'LATIN_1_ROLE' has snippet 0 that is not UTF-8"
    ):
        read_tff_shakespeare(tmp_path / "latin.h5", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="nowhere.json does not exist"):
        read_tff_shakespeare(tmp_path / "latin.h5", tokenizer=tmp_path / "nowhere.json")
    with pytest.raises(ValueError, match="no end-of-text token '</s>'"):
        read_tff_shakespeare(tmp_path / "latin.h5", tokenizer=tokenizer_path, eos_token="</s>")


def test_pad_id_is_past_every_id_even_with_holes():
    from tokenizers import Tokenizer, models

    holes = Tokenizer(models.WordLevel({"a": 0, EOS_TOKEN: 2, "b": 5}, unk_token="a"))
    assert holes.get_vocab_size(with_added_tokens=True) == 3
    assert text.vocab_size(holes) == 6  # ids run to 5: classes 0..5, padding past them all
    assert text.next_token_task(holes).pad_id == 6
