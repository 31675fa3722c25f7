"""Data preparation: text extraction, dedupe, split by document, tokenizer and token files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nsa_serve.tokenizer import Tokenizer
from nsa_serve.train.extract import html_to_text, is_english_prose, pod_to_text, rst_to_text
from nsa_serve.train.prepare import collect_documents, split_documents
from nsa_serve.train.tokens import TokenFileError, read_tokens, write_tokens

from train_helpers import prepared_data, write_fixture_tree


def test_rst_markup_is_stripped_words_stay():
    src = ("Title\n=====\n\n.. note::\n   :class: x\n\nUse :c:func:`kmalloc` and ``GFP_KERNEL`` "
           "as in `the guide <http://x>`_.\n")
    out = rst_to_text(src)
    assert "=====" not in out and ".. note" not in out and ":class:" not in out
    assert "Use kmalloc and GFP_KERNEL as in the guide." in out
    assert out.startswith("Title")


def test_pod_commands_and_codes_are_stripped():
    out = pod_to_text("=head1 NAME\n\nperlx - B<bold> I<C<nested>> L<text|perlfunc>\n\n=over 4\n\n=item one\n\n=cut\n")
    assert "=head1" not in out and "=over" not in out and "=cut" not in out
    assert "NAME" in out and "one" in out
    assert "perlx - bold nested text" in out


def test_html_text_skips_script_and_style():
    out = html_to_text("<html><head><title>t</title><style>p{}</style></head><body><p>Hello <b>world</b>"
                       "</p><script>var x=1;</script><p>Bye</p></body></html>")
    assert "Hello world" in out and "Bye" in out
    assert "var x" not in out and "p{}" not in out


def test_english_filter():
    assert is_english_prose("The kernel schedules tasks. " * 20)
    assert not is_english_prose("内核调度任务。" * 100)
    assert not is_english_prose("short")
    assert not is_english_prose("0x1f 0x2e 0x3d, " * 50)


def test_collect_dedupes_and_skips(tmp_path):
    root = write_fixture_tree(tmp_path / "src")
    docs, stats = collect_documents([root])
    names = [n for n, _ in docs]
    assert stats["duplicates"] == 1  # copy.rst == page3.rst
    assert stats["skipped_sphinx_html"] == 1  # intro.html has _sources/intro.rst.txt
    assert not any("translations" in n for n in names)
    assert not any(n.endswith("short.txt") for n in names)
    assert any(n.endswith("zipped.rst.gz") for n in names)
    assert any(n.endswith("perlfake.pod") for n in names)
    assert len(docs) == 24 + 1 + 1 + 1  # pages, zipped, sphinx source, pod
    assert names == sorted(names)


def test_split_is_by_document_seeded_and_disjoint():
    docs = [(f"d{i}", f"text {i}") for i in range(50)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert not {n for n, _ in train} & {n for n, _ in held}
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    assert split_documents(docs, 0.1, seed=4) != (train, held)


def test_prepare_writes_tokens_tokenizer_and_manifest():
    data = prepared_data()
    tok = Tokenizer(data / "tokenizer.model")
    train, held = read_tokens(data / "train.bin"), read_tokens(data / "heldout.bin")
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["train"]["num_tokens"] == train.shape[0]
    assert manifest["heldout"]["num_tokens"] == held.shape[0] > 0
    assert train.dtype == np.uint16 and int(train.max()) < tok.vocab_size
    # Documents are framed [bos] … [eos] and decode back to the extracted English.
    assert int(train[0]) == tok.bos_id
    assert int((train == tok.bos_id).sum()) == int((train == tok.eos_id).sum()) == manifest["train"]["docs_used"]
    first_eos = int(np.flatnonzero(np.asarray(train) == tok.eos_id)[0])
    assert "This is document number" in tok.decode(train[1:first_eos].tolist())
    assert "<|end|>" in [tok.id_to_piece(i) for i in range(tok.vocab_size)]


def test_token_file_roundtrip_and_errors(tmp_path):
    info = write_tokens(tmp_path / "t.bin", [[1, 5, 2], [1, 65535, 2]], {"split": "x"})
    assert info["num_tokens"] == 6 and info["bytes"] == 12
    assert read_tokens(tmp_path / "t.bin").tolist() == [1, 5, 2, 1, 65535, 2]
    with pytest.raises(TokenFileError, match="uint16"):
        write_tokens(tmp_path / "u.bin", [[70000]], {})
    with pytest.raises(TokenFileError, match="prepare-data"):
        read_tokens(tmp_path / "missing.bin")
    (tmp_path / "t.bin").write_bytes(b"\x01\x00" * 4)  # metadata now disagrees
    with pytest.raises(TokenFileError, match="re-run prepare-data"):
        read_tokens(tmp_path / "t.bin")
