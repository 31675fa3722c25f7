"""`nsa-serve <command> --help`: every option says what it does, and its default once (none where it has none)."""

from __future__ import annotations

import argparse
import re

import pytest

from nsa_serve.cli import build_parser
from nsa_serve.help_format import DefaultsHelpFormatter


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_formatter_appends_only_what_help_does_not_say():
    p = argparse.ArgumentParser(formatter_class=DefaultsHelpFormatter)
    p.add_argument("--plain", type=int, default=5, help="a number")
    p.add_argument("--worded", default=None, help="context length (default: the model's)")
    p.add_argument("--worded-value", type=int, default=1, help="cores kept free (default 1)")
    p.add_argument("--after-semicolon", default="x", help="a mode; default: x unless y")
    p.add_argument("--plural", default="auto", help="sampling defaults: 'auto' or a folder")
    p.add_argument("--required", required=True, help="a file")
    p.add_argument("--empty", default="", help="a prefix")
    p.add_argument("--flag", action="store_true", help="a switch")
    text = _flat(p.format_help())
    assert "a number (default: 5)" in text
    assert "context length (default: the model's) --worded-value" in text
    assert "cores kept free (default 1) --after" in text
    assert "a mode; default: x unless y --plural" in text
    assert "sampling defaults: 'auto' or a folder (default: auto)" in text  # "defaults" is not a statement
    assert "a file --empty" in text
    assert "a prefix --flag" in text
    assert "a switch (default: False)" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_no_option_states_its_default_twice(command):
    text = _flat(_subparsers(build_parser())[command].format_help())
    assert "(default: None)" not in text
    assert not re.search(r"\(default[^)]*\) \(default", text), text


@pytest.mark.parametrize("command", sorted(_subparsers(build_parser())))
def test_every_option_says_what_it_does(command):
    sp = _subparsers(build_parser())[command]
    assert sp.formatter_class is DefaultsHelpFormatter
    bare = [a.option_strings or a.dest for a in sp._actions if not (a.help or "").strip()]
    assert not bare, f"{command}: options without help {bare}"


def test_serve_help_does_not_print_the_api_key(monkeypatch):
    # The key's option takes its default from the environment: argparse's own formatter printed
    # that default, i.e. the secret, in --help.
    monkeypatch.setenv("NSA_SERVE_API_KEY", "sekrit-7319")
    text = _subparsers(build_parser())["serve"].format_help()
    assert "sekrit-7319" not in text
    assert "$NSA_SERVE_API_KEY" in text


def test_loadtest_options_say_what_they_do_and_keep_the_key_out(monkeypatch):
    from nsa_loadtest.cli import build_parser as loadtest_parser

    monkeypatch.setenv("NSA_LOADTEST_API_KEY", "sekrit-5521")
    p = loadtest_parser()
    bare = [a.option_strings for a in p._actions if not (a.help or "").strip()]
    assert not bare, f"nsa-loadtest options without help {bare}"
    assert "sekrit-5521" not in p.format_help()
