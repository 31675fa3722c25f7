"""Jinja chat templates (nsa_serve/chat_template.py): rendering, special tokens, the sandbox, the
model directory's chat_template.jinja, and the server's --chat-template / request templates through
a real uvicorn server and the openai client."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys

import pytest

from nsa_serve.chat_template import ChatTemplate, ChatTemplateError, detect_content_format, load_chat_template
from nsa_serve.tokenizer import ROLES, Tokenizer, render_chat

# The built-in template written in Jinja: the same text, so the same ids.
BUILT_IN_AS_JINJA = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

# A template in the style of real ones: tools listed in a system turn, tool calls as JSON, a
# refused role, and an extra variable from chat_template_kwargs.
CUSTOM = """{{ bos_token }}{% if tools %}<|system|>
Tools: {% for t in tools %}{{ t.function.name }}{% if not loop.last %}, {% endif %}{% endfor %}<|end|>
{% endif %}{% for m in messages %}
{% if m.role == 'developer' %}{{ raise_exception('this template has no developer role') }}{% endif %}
<|{{ m.role }}|>
{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}<|end|>
{% endfor %}
{% if add_generation_prompt %}<|assistant|>
{% if reply_prefix is defined %}{{ reply_prefix }}{% endif %}{% endif %}"""


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer(tiny_model_dir / "tokenizer.model")


def _random_conversation(rng: random.Random) -> list[dict]:
    words = ["hi", "Paris", "ünïcode", "a\nb", "  spaced ", "x" * 30, "<|user|>", "{}", "42"]
    return [{"role": rng.choice(ROLES), "content": " ".join(rng.choices(words, k=rng.randint(0, 5)))}
            for _ in range(rng.randint(1, 5))]


def test_a_jinja_copy_of_the_built_in_template_gives_the_same_ids(tok):
    template = ChatTemplate(BUILT_IN_AS_JINJA)
    rng = random.Random(0)
    for _ in range(40):
        conv = _random_conversation(rng)
        conv[-1]["content"] += " end"  # continue_final_message needs text to continue
        for agp, cfm in ((True, False), (False, False), (False, True)):
            want = tok.encode(render_chat(conv, agp, cfm))
            text = tok.apply_chat_template(conv, agp, cfm, chat_template=template)
            assert tok.encode_chat(text, template) == want, (conv, agp, cfm)


def test_control_tokens_in_the_text_become_their_ids_and_no_bos_is_added(tok):
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}")
    ids = tok.encode_chat(tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                                                  False, chat_template=template), template)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == 2
    assert ids[-1] == tok.eos_id
    no_bos = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert tok.bos_id not in tok.encode_chat("abc", no_bos)  # the template decides, as in vLLM
    assert tok.encode_chat("abc") == tok.encode("abc")  # the built-in template: BOS in front


def test_template_failures_are_value_errors_naming_the_field(tok):
    with pytest.raises(ChatTemplateError, match="does not compile") as err:
        ChatTemplate("{% for m in messages %}")
    assert err.value.param == "chat_template"
    custom = ChatTemplate(CUSTOM)
    with pytest.raises(ChatTemplateError, match="no developer role") as err:
        tok.apply_chat_template([{"role": "developer", "content": "x"}], chat_template=custom)
    assert err.value.param == "messages"
    with pytest.raises(ChatTemplateError, match="may not set 'messages'") as err:
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=custom,
                                template_kwargs={"messages": []})
    assert err.value.param == "chat_template_kwargs"
    with pytest.raises(ChatTemplateError, match="may not set 'chat_template'"):  # the built-in path too
        tok.apply_chat_template([{"role": "user", "content": "x"}], template_kwargs={"chat_template": "{{ 1 }}"})
    with pytest.raises(ChatTemplateError):
        ChatTemplate("  ")


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{% set x = [] %}{{ x.append(1) }}",
                                    "{{ messages.clear() }}"])
def test_the_sandbox_refuses_python_internals_and_mutation(tok, source):
    with pytest.raises(ChatTemplateError, match="failed"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=ChatTemplate(source))


def test_tojson_writes_json_as_is_and_kwargs_reach_the_template(tok):
    t = ChatTemplate("{{ messages[0] | tojson }}|{{ flag }}|{{ messages[0] | tojson(indent=1) | length > 30 }}")
    msg = {"role": "user", "content": "<b> & 'ü'"}
    out = t.render([msg], add_generation_prompt=False, kwargs={"flag": True})
    first, flag, _ = out.split("|")
    assert json.loads(first) == msg and "ü" in first and "<b> &" in first and flag == "True"


def test_continue_final_message_ends_the_prompt_at_the_final_text(tok):
    t = ChatTemplate(CUSTOM)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    text = t.render(conv, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|assistant|>\nHel")
    hides = ChatTemplate("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    with pytest.raises(ChatTemplateError, match="does not show it"):
        hides.render(conv, add_generation_prompt=False, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        t.render(conv, add_generation_prompt=True, continue_final_message=True)


def test_load_chat_template_tells_a_file_from_a_template(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text(CUSTOM)
    assert load_chat_template(str(f)) == CUSTOM
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(ChatTemplateError, match="looks like a path"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_the_model_directorys_chat_template_is_the_default(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "chat_template.jinja").write_text(CUSTOM)
    tok = Tokenizer(tmp_path / "tokenizer.model")
    conv = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(conv) == "<s><|user|>\nhi<|end|>\n<|assistant|>\n"
    assert tok.encode_chat(tok.apply_chat_template(conv))[0] == tok.bos_id
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ChatTemplateError, match="chat_template.jinja"):
        Tokenizer(tmp_path / "tokenizer.model")


# Templates written for OpenAI's content parts (as Llama 4's and Gemma 3's are): each text part
# shown in brackets; the second also takes a plain string.
PARTS = "{% for m in messages %}{% for p in m['content'] %}[{{ p.text }}]{% endfor %}|{% endfor %}"
PARTS_OR_STRING = ("{% for m in messages %}{% if m.content is string %}{{ m.content }}{% else %}"
                   "{% for p in m.content | selectattr('type', 'equalto', 'text') %}[{{ p.text }}]{% endfor %}"
                   "{% endif %}|{% endfor %}")


@pytest.mark.parametrize("source, want", [
    (BUILT_IN_AS_JINJA, "string"), (CUSTOM, "string"), (PARTS, "openai"), (PARTS_OR_STRING, "openai"),
    # Loops over other things (tools, a message's tool calls) are not content loops.
    ("{% for m in messages %}{% for c in m.tool_calls %}{{ c }}{% endfor %}{{ m.content }}{% endfor %}", "string"),
    ("{% for m in messages %}{% for p in m['content'] | list %}{{ p }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% set parts = m.content %}{% for p in parts %}{{ p.text }}{% endfor %}{% endfor %}",
     "openai"),
    ("{% for m in messages %}{% set c = m.content %}{{ c }}{% for t in tools %}{{ t }}{% endfor %}{% endfor %}",
     "string"),
])
def test_auto_content_format_reads_whether_the_template_loops_over_content(source, want):
    assert detect_content_format(source) == want == ChatTemplate(source).content_format


def test_content_reaches_the_template_in_its_format(tok):
    conv = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None}]
    conv_before = json.dumps(conv)
    # openai: a string is one part, parts stay apart, no content is no parts.
    assert tok.apply_chat_template(conv, chat_template=ChatTemplate(PARTS)) == "[be brief]|[a][b]||"
    assert tok.apply_chat_template(conv, chat_template=ChatTemplate(PARTS_OR_STRING)) == "[be brief]|[a][b]||"
    # string: parts joined, none as "" — forced on a template that takes either, and the default
    # for one that shows m.content.
    forced = tok.apply_chat_template(conv, chat_template=ChatTemplate(PARTS_OR_STRING), content_format="string")
    assert forced == "be brief|ab||"
    plain = ChatTemplate("{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert tok.apply_chat_template(conv, chat_template=plain) == "be brief|ab||"
    assert tok.apply_chat_template(conv, chat_template=plain, content_format="openai").startswith("[{")
    assert json.dumps(conv) == conv_before  # the caller's messages are left as they were
    # continue_final_message in parts: the prompt ends at the last part's text (as transformers).
    tail = [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "He"}, {"type": "text", "text": "llo"}]}]
    assert tok.apply_chat_template(tail, False, True, chat_template=ChatTemplate(PARTS)) == "[hi]|[He][llo"
    with pytest.raises(ChatTemplateError, match="text parts"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image_url"}]}],
                                chat_template=ChatTemplate(PARTS))
    with pytest.raises(ValueError, match="content_format"):
        tok.apply_chat_template(conv, chat_template=plain, content_format="list")


# -- through the HTTP server ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def templated_server(tiny_model_dir):
    from api_fixtures import start_server

    server = start_server(tiny_model_dir, chat_template=CUSTOM, trust_request_chat_template=True)
    yield server
    server.stop()


def _tokenize(server, **body) -> dict:
    with server.http() as c:
        return c.post("/tokenize", json=body).json()


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}}]


def test_served_template_renders_chats_and_tokenize_counts_the_same_prompt(templated_server):
    client = templated_server.openai()
    msgs = [{"role": "user", "content": "hi"}]
    tokens = _tokenize(templated_server, messages=msgs, chat_template_kwargs={"reply_prefix": "Sure"})
    assert "".join(tokens["token_strs"]).endswith("<|assistant|>\nSure".replace("\n", "<0x0A>"))
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=3,
                                           extra_body={"chat_template_kwargs": {"reply_prefix": "Sure"}})
    assert reply.usage.prompt_tokens == tokens["count"]
    # A Jinja template writes its own BOS: add_special_tokens=false does not take it off.
    assert _tokenize(templated_server, messages=msgs, add_special_tokens=False)["tokens"] == \
        _tokenize(templated_server, messages=msgs)["tokens"]
    # Tools reach the template as `tools` (no built-in system turn), and a "required" call still
    # comes back as a tool call.
    with_tools = _tokenize(templated_server, messages=msgs, tools=TOOLS)
    assert "Tools: get_weather" in "".join(with_tools["token_strs"]).replace("\u2581", " ")
    call = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, tools=TOOLS,
                                          tool_choice="required", max_tokens=40)
    assert call.usage.prompt_tokens == with_tools["count"]
    if call.choices[0].finish_reason == "tool_calls":
        assert call.choices[0].message.tool_calls[0].function.name == "get_weather"
    # Documents reach a Jinja template (the built-in one refuses them: test_api_errors).
    docs_tpl = "{% for d in documents %}[{{ d.title }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    with_docs = _tokenize(templated_server, messages=msgs, chat_template=docs_tpl,
                          documents=[{"title": "Manual", "text": "x"}])
    assert "[Manual]" in "".join(with_docs["token_strs"]).replace("\u2581", " ")
    # Streaming through the template.
    chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=4,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == _tokenize(templated_server, messages=msgs)["count"]


def test_template_errors_are_400s_and_the_server_goes_on(templated_server):
    import openai

    client = templated_server.openai()
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="no developer role"):
        client.chat.completions.create(model=model, messages=[{"role": "developer", "content": "x"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="does not compile") as err:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"chat_template": "{% if %}"})
    assert err.value.body["param"] == "chat_template"
    with pytest.raises(openai.BadRequestError, match="may not set 'tools'"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"chat_template_kwargs": {"tools": []}})
    ok = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_a_trusted_request_template_replaces_the_served_one(templated_server):
    own = "{{ bos_token }}{% for m in messages %}Q: {{ m.content }}\n{% endfor %}A:"
    tokens = _tokenize(templated_server, messages=[{"role": "user", "content": "hi"}], chat_template=own)
    text = "".join(tokens["token_strs"]).replace("\u2581", " ")
    assert "Q:" in text and "<|user|>" not in text
    client = templated_server.openai()
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"chat_template": own})
    assert reply.usage.prompt_tokens == tokens["count"]


def test_a_parts_template_gets_the_request_parts_through_the_server(templated_server):
    two_parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "you"}]}]
    tokens = _tokenize(templated_server, messages=two_parts, chat_template=PARTS)
    assert "".join(tokens["token_strs"]).replace("\u2581", " ").lstrip() == "[hi][you]|"
    client = templated_server.openai()
    reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2, messages=two_parts,
                                           extra_body={"chat_template": PARTS})
    assert reply.usage.prompt_tokens == tokens["count"]
    # The served (string) template gets the parts joined.
    joined = _tokenize(templated_server, messages=two_parts)
    assert "hiyou" in "".join(joined["token_strs"]).replace("\u2581", " ")
    with pytest.raises(Exception, match="only text content parts"):
        client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                       messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
                                           "url": "http://x/y.png"}}]}], extra_body={"chat_template": PARTS})


def test_the_default_server_refuses_request_templates_and_takes_kwargs(api_server):
    import openai

    client = api_server.openai()
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="--trust-request-chat-template") as err:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=2,
                                       extra_body={"chat_template": "{{ messages }}"})
    assert err.value.body["param"] == "chat_template"
    # Extra variables are the template's to use; the built-in one uses none (as in vLLM).
    plain = client.chat.completions.create(model=model, messages=msgs, max_tokens=2)
    kw = client.chat.completions.create(model=model, messages=msgs, max_tokens=2,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert kw.usage.prompt_tokens == plain.usage.prompt_tokens == _tokenize(api_server, messages=msgs)["count"]
    # /tokenize's add_special_tokens=false leaves the built-in template's BOS off, nothing else.
    with_bos = _tokenize(api_server, messages=msgs)["tokens"]
    assert with_bos[0] == api_server.engine.tokenizer.bos_id
    assert _tokenize(api_server, messages=msgs, add_special_tokens=False)["tokens"] == with_bos[1:]


def test_serve_stops_on_a_missing_template_before_loading_weights(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nsa_serve.cli", "serve", "--chat-template",
                          str(tmp_path / "nope.jinja"), "--port", "9"], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "--chat-template" in run.stderr and "looks like a path" in run.stderr
