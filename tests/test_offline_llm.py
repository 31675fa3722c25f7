"""vLLM-style offline inference: `LLM.generate` and `LLM.chat` give what the reference model
computes for the same token ids."""

from __future__ import annotations

import pytest

from engine_helpers import reference_greedy, single_thread_torch, tiny_model_dir
from nsa_serve import LLM, SamplingParams
from nsa_serve.engine.protocol import InvalidRequestError
from nsa_serve.tokenizer import render_chat

one_thread = pytest.fixture(autouse=True, scope="module")(single_thread_torch)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(str(tiny_model_dir(True)), device="cpu", dtype="float32", num_pages=256)


def test_generate_gives_the_reference_greedy_tokens_in_prompt_order(llm):
    tok = llm.get_tokenizer()
    prompts = ["def read_config(path):", "The capital of", [5, 9, 11, 40, 41]]
    outs = llm.generate(prompts + [{"prompt": "Hi"}, {"prompt_token_ids": [7, 8, 9]}], GREEDY)
    ids = [tok.encode(prompts[0]), tok.encode(prompts[1]), prompts[2], tok.encode("Hi"), [7, 8, 9]]
    assert [o.prompt_token_ids for o in outs] == ids
    for o, p in zip(outs, ids):
        assert o.finished and o.outputs[0].token_ids == reference_greedy(llm.engine.model, p, 6)
        assert o.outputs[0].text == tok.decode(p + o.outputs[0].token_ids)[len(tok.decode(p)):]
    one = llm.generate("The capital of", GREEDY)  # a single prompt
    assert len(one) == 1 and one[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    # One SamplingParams each; n > 1.
    mixed = llm.generate(["a", "b"], [GREEDY, SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=4)])
    assert len(mixed[0].outputs) == 1 and len(mixed[1].outputs) == 2
    assert all(len(c.token_ids) == 4 for c in mixed[1].outputs)


def test_chat_renders_the_template_as_the_server_does(llm):
    tok = llm.get_tokenizer()
    conv = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a prime."}]
    (out,) = llm.chat(conv, GREEDY)
    want = tok.encode(render_chat(conv))
    assert out.prompt_token_ids == want
    assert out.outputs[0].token_ids == reference_greedy(llm.engine.model, want, 6)
    both = llm.chat([conv, conv[1:]], GREEDY)
    assert both[0].outputs[0].token_ids == out.outputs[0].token_ids and len(both) == 2
    # vLLM's chat_template argument: a Jinja copy of the built-in template gives the same prompt; a
    # template of its own another; a bad one a clear error naming the field.
    same = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    (jinja,) = llm.chat(conv, GREEDY, chat_template=same)
    assert jinja.prompt_token_ids == want and jinja.outputs[0].token_ids == out.outputs[0].token_ids
    (own,) = llm.chat(conv, GREEDY, chat_template="{% for m in messages %}{{ m.content }} {% endfor %}{{ tail }}",
                      chat_template_kwargs={"tail": "Answer:"})
    assert own.prompt_token_ids == tok.encode("Be terse. Name a prime. Answer:", add_bos=False)
    parts = "{% for m in messages %}{% for p in m.content %}{{ p.text }} {% endfor %}{% endfor %}"
    for fmt in ("auto", "openai"):  # vLLM's chat_template_content_format: parts for a template that loops over them
        (listed,) = llm.chat(conv, GREEDY, chat_template=parts, chat_template_content_format=fmt)
        assert listed.prompt_token_ids == tok.encode("Be terse. Name a prime. ", add_bos=False)
    with pytest.raises(InvalidRequestError, match="does not compile") as err:
        llm.chat(conv, GREEDY, chat_template="{% if %}")
    assert err.value.param == "chat_template"


def test_bad_input_is_a_clear_error_and_the_engine_goes_on(llm):
    with pytest.raises(InvalidRequestError, match="temperature"):
        llm.generate("x", SamplingParams(temperature=5.0))
    with pytest.raises(InvalidRequestError, match="temperature"):  # the first prompt is not left running
        llm.generate(["a", "b"], [GREEDY, SamplingParams(temperature=5.0)])
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(InvalidRequestError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["x"], [GREEDY, GREEDY])
    with pytest.raises(InvalidRequestError, match="prompt"):
        llm.generate([3.5])
    with pytest.raises(InvalidRequestError):
        llm.chat([{"role": "robot", "content": "x"}])
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate("ok", GREEDY)[0].outputs[0].token_ids
    llm.engine.block_manager.check_all_free()


def test_use_tqdm_shows_progress_on_stderr_and_changes_nothing_else(llm, capsys):
    prompts = ["def read_config(path):", "The capital of"]
    shown = llm.generate(prompts, GREEDY)  # vLLM's default: a bar over the finished prompts
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "2/2" in err and "output:" in err and "toks/s" in err
    quiet = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == ""
    assert [o.outputs[0].token_ids for o in quiet] == [o.outputs[0].token_ids for o in shown]
    (chat,) = llm.chat([{"role": "user", "content": "hi"}], GREEDY, use_tqdm=False)
    assert capsys.readouterr().err == "" and len(chat.outputs[0].token_ids) == 6


def test_vllm_engine_options_are_taken_or_refused_with_the_reason():
    model = str(tiny_model_dir(True))
    # vLLM keyword arguments whose value is what this engine does anyway.
    llm = LLM(model, device="cpu", num_pages=64, tensor_parallel_size=1, kv_cache_dtype="auto",
              trust_remote_code=True, enable_chunked_prefill=True, quantization=None)
    assert llm.generate("x", GREEDY, use_tqdm=False)[0].outputs[0].finish_reason == "length"
    for kw, message in (({"tensor_parallel_size": 2}, "tensor_parallel_size 2: .*one GPU"),
                        ({"kv_cache_dtype": "fp8"}, "quantized caches"), ({"quantization": "awq"}, "quantized weights")):
        with pytest.raises(ValueError, match=message):
            LLM(model, device="cpu", num_pages=64, **kw)
    with pytest.raises(TypeError):  # anything else is still an unknown argument
        LLM(model, device="cpu", num_pages=64, swap_space=4)


def test_chat_shows_tools_as_the_server_does(llm):
    from nsa_serve.api.tools import parse_tools, tools_system_text

    tok = llm.get_tokenizer()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    conv = [{"role": "user", "content": "Weather in Paris?"}]
    (out,) = llm.chat(conv, GREEDY, tools=tools, use_tqdm=False)
    # The built-in template: a system turn listing the tools before the conversation (the server's).
    shown = [{"role": "system", "content": tools_system_text(parse_tools(tools))}] + conv
    assert out.prompt_token_ids == tok.encode(render_chat(shown))
    # A Jinja template gets them as `tools`.
    (jinja,) = llm.chat(conv, GREEDY, tools=tools, use_tqdm=False,
                        chat_template="{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}")
    assert jinja.prompt_token_ids == tok.encode("[get_weather]Weather in Paris?", add_bos=False)
    with pytest.raises(InvalidRequestError, match="tools") as err:
        llm.chat(conv, GREEDY, tools=[{"type": "function", "function": {"name": "bad name!"}}], use_tqdm=False)
    assert err.value.param == "tools"


def test_max_logprobs_bounds_what_a_request_may_ask():
    # vLLM's max_logprobs: 20 by default; raised, a request gets that many alternatives (best
    # first, the sampler's top-k over the whole distribution); -1 is the vocabulary.
    wide = LLM(str(tiny_model_dir(True)), device="cpu", dtype="float32", num_pages=64, max_logprobs=40)
    params = SamplingParams(temperature=0.0, max_tokens=2, logprobs=40, prompt_logprobs=40, ignore_eos=True)
    out, = wide.generate("The capital of", params, use_tqdm=False)
    tops = [t.top for t in out.outputs[0].logprobs]
    assert [len(top) for top in tops] == [40, 40]
    assert all([lp for _, _, lp in top] == sorted((lp for _, _, lp in top), reverse=True) for top in tops)
    assert all(len(e.top) == 40 for e in out.prompt_logprobs[1:])
    with pytest.raises(InvalidRequestError, match="between 0 and 40") as e:
        wide.generate("x", SamplingParams(max_tokens=1, logprobs=41), use_tqdm=False)
    assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequestError, match="between 0 and 20") as e:
        LLM(str(tiny_model_dir(True)), device="cpu", num_pages=64).generate(
            "x", SamplingParams(max_tokens=1, prompt_logprobs=21), use_tqdm=False)
    assert e.value.param == "prompt_logprobs"
    whole = LLM(str(tiny_model_dir(True)), device="cpu", num_pages=64, max_logprobs=-1)
    assert whole.engine.max_logprobs == whole.engine.config.vocab_size
    with pytest.raises(ValueError, match="max_logprobs"):
        LLM(str(tiny_model_dir(True)), device="cpu", num_pages=64, max_logprobs=-2)
