"""RequiredCallStream: the streamed tool-call deltas of a tool_choice "required" reply, fed in
every kind of piece, give back exactly the calls the whole reply parses to; parse_auto_calls: which
"auto" replies are calls."""

from __future__ import annotations

import json
import random

import pytest

from nsa_serve.api.tools import RequiredCallStream, parse_auto_calls

REPLIES = [
    # what the grammar produces: name first, compact separators
    '[{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}, '
    '{"name": "get_time", "parameters": {"zone": -3}}]',
    # keys the other way round; strings holding brackets, commas, quotes and escapes
    '[{"parameters": {"a": [1, {"b": "]}\\",{"}]}, "name": "f\\u00e9"},{"name":"g","parameters":7},'
    '{"name":"h","parameters":"x,}"}, {"name": "k", "parameters": true}]',
    # free whitespace, an empty object, a number that ends at a space
    '[ { "name" : "a" , "parameters" : { } } , {"name":"b","parameters":-1.5e3 } ]',
]


def _stream(text: str, pieces: list[int]) -> list[dict]:
    st, deltas, i = RequiredCallStream(), [], 0
    for n in pieces:
        deltas += st.feed(text[i:i + n])
        i += n
    return deltas + st.feed(text[i:])


def _calls(deltas: list[dict]) -> list[tuple[str, str]]:
    heads = [d for d in deltas if "id" in d]
    assert [d["index"] for d in heads] == list(range(len(heads)))  # one header a call, in order
    assert all(d["id"].startswith("call_") and d["type"] == "function" for d in heads)
    assert all("name" not in d["function"] for d in deltas if "id" not in d)
    assert [d["index"] for d in deltas] == sorted(d["index"] for d in deltas)  # call after call
    return [(h["function"]["name"], "".join(d["function"]["arguments"] for d in deltas if d["index"] == h["index"]))
            for h in heads]


@pytest.mark.parametrize("reply", range(len(REPLIES)))
def test_any_pieces_give_the_whole_replys_calls(reply):
    text = REPLIES[reply]
    want = [(c["name"], c["parameters"]) for c in json.loads(text)]
    one_by_one = _calls(_stream(text, [1] * len(text)))
    assert [(n, json.loads(a)) for n, a in one_by_one] == want
    for seed in range(200):
        rng = random.Random(seed)
        got = _calls(_stream(text, [rng.randint(0, 6) for _ in range(80)]))
        assert [(n, json.loads(a)) for n, a in got] == want
        assert got == one_by_one  # the arguments are the value's own text, however it was split


def test_arguments_stream_as_they_grow_and_a_call_waits_for_its_name():
    st = RequiredCallStream()
    assert st.feed('[{"name": "get_wea') == []  # the name is not closed yet
    head = st.feed('ther", "parameters": {"ci')
    assert len(head) == 1 and head[0]["function"] == {"name": "get_weather", "arguments": '{"ci'}
    assert st.feed('ty": "Oslo"') == [{"index": 0, "function": {"arguments": 'ty": "Oslo"'}}]
    assert st.feed("}}") == [{"index": 0, "function": {"arguments": "}"}}]  # the object's "}" only
    assert st.feed(", ") == []
    # keys the other way round: the arguments wait for the name, then go out with the header
    assert st.feed('{"parameters": {"zone": 2}, ') == []
    head = st.feed('"name": "get_time"}]')
    assert len(head) == 1 and head[0]["index"] == 1
    assert head[0]["function"] == {"name": "get_time", "arguments": '{"zone": 2}'}


def test_an_auto_reply_is_calls_only_when_it_is_the_whole_list_of_known_tools():
    names = ("get_weather", "get_time")
    calls = parse_auto_calls('  [{"name": "get_weather", "parameters": {"city": "Oslo"}},'
                             ' {"parameters": {}, "name": "get_time"}]\n', names)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    one = '[{"name": "get_time", "parameters": {"zone": 2}}]'
    assert parse_auto_calls(one, names, parallel=False) is not None
    for text in ("It is sunny.", "", "[]", "[1, 2]", one[:-1], one + " and more",
                 '[{"name": "get_date", "parameters": {}}]', '[{"name": "get_time", "parameters": 3}]',
                 '[{"name": "get_time", "parameters": {}, "extra": 1}]', "The list: " + one):
        assert parse_auto_calls(text, names) is None, text
    assert parse_auto_calls(one[:-1] + ', ' + one[1:], names, parallel=False) is None
