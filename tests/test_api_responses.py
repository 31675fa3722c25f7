"""/v1/responses through the official client: the same replies as the chat completions they
translate to, streamed as the typed events, stored and continued with previous_response_id."""

from __future__ import annotations

import json

import pytest
import api_fixtures  # noqa: F401  (skips this module on a GPU machine without the HTTP stack)

import openai  # after api_fixtures, which skips this module on a GPU machine without openai
from nsa_serve.api.response_store import ResponseStore, StoredResponse

GREEDY = {"ignore_eos": True}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                          "properties": {"city": {"type": "string", "maxLength": 12}}}}


@pytest.fixture(scope="module")
def client(api_server):  # noqa: F811
    return api_server.openai()


def chat(client, name, messages, max_tokens, **extra):
    r = client.chat.completions.create(model=name, messages=messages, max_tokens=max_tokens, temperature=0.0,
                                       extra_body={**GREEDY, **extra})
    return r.choices[0].message.content, r.usage


def test_a_response_is_the_chat_completion_of_its_instructions_and_input(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    r = client.responses.create(model=name, instructions="Be terse.", input="Name a prime number.",
                                max_output_tokens=6, temperature=0.0, extra_body=GREEDY, metadata={"k": "v"})
    text, usage = chat(client, name, [{"role": "system", "content": "Be terse."},
                                      {"role": "user", "content": "Name a prime number."}], 6)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == name
    assert r.output_text == text and len(r.output) == 1 and r.output[0].type == "message"
    assert r.output[0].role == "assistant" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == 6 == usage.completion_tokens
    assert r.usage.total_tokens == usage.total_tokens and r.metadata == {"k": "v"}
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    done = client.responses.create(model=name, input="Is 7 prime?", max_output_tokens=8,
                                   extra_body={"guided_choice": ["yes", "no"]})
    assert done.status == "completed" and done.incomplete_details is None and done.output_text in ("yes", "no")
    # Input as items: messages with text parts, a developer turn.
    items = client.responses.create(model=name, max_output_tokens=4, temperature=0.0, extra_body=GREEDY, input=[
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a "},
                                                        {"type": "input_text", "text": "prime number."}]}])
    assert items.output_text == chat(client, name, [{"role": "system", "content": "Be terse."},
                                                    {"role": "user", "content": "Name a prime number."}], 4)[0]


def test_a_stream_is_the_typed_events_of_the_same_reply(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    kw = dict(model=name, input="Tell me about lists.", max_output_tokens=12, temperature=0.0, extra_body=GREEDY)
    whole = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 2 and "".join(deltas) == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == 12
    assert client.responses.retrieve(final.id).output_text == whole.output_text  # stored when it ended


def test_previous_response_id_continues_the_stored_conversation(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    first = client.responses.create(model=name, instructions="Be terse.", input="Name a prime number.",
                                    max_output_tokens=5, temperature=0.0, extra_body=GREEDY)
    second = client.responses.create(model=name, input="And another?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0.0, extra_body=GREEDY)
    # The earlier instructions are not carried over (OpenAI's rule); its input and output are.
    text, usage = chat(client, name, [{"role": "user", "content": "Name a prime number."},
                                      {"role": "assistant", "content": first.output_text},
                                      {"role": "user", "content": "And another?"}], 5)
    assert second.output_text == text and second.usage.input_tokens == usage.prompt_tokens
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(first.id).output_text == first.output_text
    unstored = client.responses.create(model=name, input="x", max_output_tokens=1, store=False)
    for call in (lambda: client.responses.retrieve(unstored.id),
                 lambda: client.responses.create(model=name, input="y", previous_response_id=unstored.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=name, input="y", previous_response_id=first.id)
    assert e.value.body["code"] == "previous_response_not_found"


def test_function_tools_give_function_call_items_and_take_their_outputs(client, api_server):  # noqa: F811
    name = api_server.engine.model_name
    kw = dict(model=name, input="Weather in Oslo?", tools=[WEATHER], max_output_tokens=160, temperature=0.0)
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        r = client.responses.create(tool_choice=choice, **kw)
        calls = [o for o in r.output if o.type == "function_call"]
        assert len(calls) >= 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
        assert set(json.loads(calls[0].arguments)) == {"city"} and r.output_text == ""
    forced = r'\[\{"name": "get_weather", "parameters": \{"city": "Oslo"\}\}\]'
    auto = client.responses.create(extra_body={"guided_regex": forced}, **kw)  # "auto": the default
    (call,) = auto.output
    assert (call.type, call.name, json.loads(call.arguments)) == ("function_call", "get_weather", {"city": "Oslo"})
    events = list(client.responses.create(extra_body={"guided_regex": forced}, stream=True, **kw))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Oslo"}]
    assert events[-1].type == "response.completed" and events[-1].response.output[0].type == "function_call"
    # The tool's result goes back as a function_call_output item of the next turn.
    after = client.responses.create(model=name, previous_response_id=auto.id, tools=[WEATHER], tool_choice="none",
                                    max_output_tokens=3, extra_body=GREEDY, input=[
                                        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
    assert after.output[0].type == "message" and after.usage.input_tokens > auto.usage.input_tokens
    # The same conversation given in full, with the call as an input item.
    full = client.responses.create(model=name, tools=[WEATHER], tool_choice="none", max_output_tokens=3,
                                   temperature=0.0, extra_body=GREEDY, input=[
                                       {"role": "user", "content": "Weather in Oslo?"},
                                       {"type": "function_call", "call_id": call.call_id, "name": "get_weather",
                                        "arguments": call.arguments},
                                       {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny"}])
    assert full.usage.input_tokens == after.usage.input_tokens


def test_a_json_schema_text_format_shapes_the_reply(client, api_server):  # noqa: F811
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    r = client.responses.create(model=api_server.engine.model_name, input="A number?", max_output_tokens=40,
                                temperature=0.0,
                                text={"format": {"type": "json_schema", "name": "num", "schema": schema}})
    assert r.status == "completed" and set(json.loads(r.output_text)) == {"n"}


@pytest.mark.parametrize("field,body", [
    ("input", {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}),
    ("input", {"input": [{"type": "reasoning", "summary": []}]}),
    ("input", {"input": []}),
    ("tools", {"input": "x", "tools": [{"type": "web_search"}]}),
    ("tool_choice", {"input": "x", "tools": [WEATHER], "tool_choice": {"type": "file_search"}}),
    ("reasoning", {"input": "x", "reasoning": {"effort": "high"}}),
    ("max_output_tokens", {"input": "x", "max_output_tokens": 10 ** 6}),
    ("text", {"input": "x", "text": {"format": {"type": "xml"}}}),
    ("metadata", {"input": "x", "metadata": {f"k{i}": "v" for i in range(17)}}),
    ("temperature", {"input": "x", "temperature": 5}),
    ("background", {"input": "x", "background": True}),
    ("conversation", {"input": "x", "conversation": "conv_1"}),
    ("prompt", {"input": "x", "prompt": {"id": "pmpt_1"}}),
    ("max_tool_calls", {"input": "x", "tools": [WEATHER], "max_tool_calls": 1}),
    ("truncation", {"input": "x", "truncation": "middle"}),
])
def test_what_the_server_cannot_honour_is_a_400_naming_the_field(api_server, field, body):  # noqa: F811
    with api_server.http() as h:
        r = h.post("/v1/responses", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text


def test_truncation_auto_drops_the_oldest_items_until_the_reply_fits(client, api_server):  # noqa: F811
    name, limit, out = api_server.engine.model_name, api_server.engine.max_model_len, 8
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"Item {i}: " + "lorem ipsum dolor sit " * (12 + i)}
             for i in range(8)] + [{"role": "user", "content": "Which item came last?"}]

    def count(conversation, instructions=True):
        system = [{"role": "system", "content": "Be terse."}] if instructions else []
        with api_server.http() as h:
            return h.post("/tokenize", json={"messages": system + conversation}).json()["count"]

    assert count(turns) + out > limit  # the premise: the whole conversation does not fit
    keep = next(k for k in range(len(turns)) if count(turns[k:]) + out <= limit)
    assert keep > 0
    with pytest.raises(openai.BadRequestError) as e:  # the default, "disabled": a 400
        client.responses.create(model=name, instructions="Be terse.", input=turns, max_output_tokens=out)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "input"
    r = client.responses.create(model=name, instructions="Be terse.", input=turns, max_output_tokens=out,
                                truncation="auto", temperature=0.0, extra_body=GREEDY)
    # As few of the oldest items as fit go; the instructions stay; the reply is the chat of the rest.
    assert r.truncation == "auto" and r.status == "incomplete" and r.usage.input_tokens == count(turns[keep:])
    text, _ = chat(client, name, [{"role": "system", "content": "Be terse."}] + turns[keep:], out)
    assert r.output_text == text
    # A conversation that fits is left whole; a last item too long on its own is still a 400.
    short = client.responses.create(model=name, input=turns[-2:], max_output_tokens=2, truncation="auto")
    assert short.usage.input_tokens == count(turns[-2:], instructions=False)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.responses.create(model=name, input=turns + [{"role": "user", "content": "x " * limit}],
                                truncation="auto")


def test_truncation_takes_the_tool_results_whose_calls_were_dropped():
    from nsa_serve.api.protocol_responses import ResponsesRequest

    req = ResponsesRequest(input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"role": "user", "content": "And now?"}], truncation="auto")
    assert [m.role for m in req.to_chat([], {}).messages] == ["user", "assistant", "tool", "user"]
    assert [m.content for m in req.to_chat([], {}, drop=1).messages] == [None, "sunny", "And now?"]
    assert [m.content for m in req.to_chat([], {}, drop=2).messages] == ["And now?"]  # no orphaned result


def test_the_store_forgets_the_oldest_past_its_capacity():
    store = ResponseStore(2)
    for i in range(3):
        store.put(f"r{i}", StoredResponse({"id": f"r{i}"}, []))
    assert store.get("r0") is None and store.get("r2").body == {"id": "r2"} and len(store) == 2
    assert store.delete("r1") and not store.delete("r1")
    assert store.chars == len(json.dumps({"id": "r2"})) + 2
    # Past the character budget the oldest go too (the newest always stays).
    small = ResponseStore(10, max_chars=300)
    for i in range(4):
        small.put(f"r{i}", StoredResponse({"id": f"r{i}"}, [{"role": "user", "content": "x" * 100}]))
    assert [small.get(f"r{i}") is not None for i in range(4)] == [False, False, True, True]
    assert small.chars <= 300
    off = ResponseStore(0)
    off.put("r", StoredResponse({}, []))
    assert off.get("r") is None


def test_output_text_logprobs_when_included(client, api_server):  # noqa: F811
    """include ["message.output_text.logprobs"] with top_logprobs: the chat completion's logprobs,
    on the output_text part and on each streamed delta."""
    name = api_server.engine.model_name
    kw = dict(model=name, input="Name a prime number.", max_output_tokens=5, temperature=0.0, extra_body=GREEDY)
    r = client.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, **kw)
    c = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Name a prime number."}],
                                       max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=2,
                                       extra_body=GREEDY)
    got = r.output[0].content[0].logprobs
    want = c.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes) for t in got] == [(t.token, t.logprob, t.bytes) for t in want]
    assert [[x.token for x in t.top_logprobs] for t in got] == [[x.token for x in t.top_logprobs] for t in want]
    events = list(client.responses.create(include=["message.output_text.logprobs"], top_logprobs=2, stream=True,
                                          **kw))
    streamed = [t for e in events if e.type == "response.output_text.delta" for t in e.logprobs]
    assert [t.token for t in streamed] == [t.token for t in got]
    assert client.responses.create(**kw).output[0].content[0].logprobs == []  # not included: none
