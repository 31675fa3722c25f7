"""/metrics agrees with a known batch of traffic (names from the metrics contract, docs/api.md)."""

from __future__ import annotations

import httpx
from api_fixtures import wait_for

from nsa_kernels.reference import tokens_read_per_step

CONTRACT = [
    "nsa:time_to_first_token_seconds", "nsa:inter_token_latency_seconds", "nsa:e2e_request_latency_seconds",
    "nsa:request_queue_time_seconds", "nsa:request_prefill_time_seconds", "nsa:request_decode_time_seconds",
    "nsa:request_prompt_tokens", "nsa:request_generation_tokens", "nsa:num_requests_running",
    "nsa:num_requests_waiting", "nsa:kv_cache_usage_perc", "nsa:summaries_stored", "nsa:prompt_tokens_total",
    "nsa:generation_tokens_total", "nsa:num_preemptions_total", "nsa:engine_step_failures_total",
    "nsa:request_success_total",
    "nsa:prefix_cache_queries_total", "nsa:prefix_cache_hits_total", "nsa:kv_tokens_read_total",
    "nsa:kv_tokens_dense_equivalent_total", "nsa:http_requests_total", "nsa:iteration_tokens_total",
    "nsa:request_inference_time_seconds", "nsa:request_time_per_output_token_seconds", "nsa:request_params_n",
    "nsa:request_params_max_tokens", "nsa:cache_config_info", "nsa:gc_pause_seconds",
]


def delta(after: dict, before: dict, key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_every_contract_metric_is_exposed_with_model_name(api_server):
    from api_fixtures import parse_metrics

    with api_server.http() as h:
        assert h.get("/v1/models").status_code == 200
        r = h.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    names = {key.split("{")[0] for key in parse_metrics(text)}
    for name in CONTRACT:
        assert name in names or f"{name}_count" in names, name
    model = api_server.engine.model_name
    samples = [ln for ln in text.splitlines() if ln.startswith("nsa:")]
    assert samples and all(f'model_name="{model}"' in ln for ln in samples)
    assert 'nsa:time_to_first_token_seconds_bucket{le="0.001"' in text  # TTFT buckets start at 1 ms
    engine = api_server.engine.engine
    info = {k: v for k, v in parse_metrics(text).items() if k.startswith("nsa:cache_config_info")}
    (key, value), = info.items()
    assert value == 1
    assert f'block_size="{engine.block_manager.page_size}"' in key
    assert f'num_gpu_blocks="{engine.block_manager.num_pages}"' in key
    assert f'enable_prefix_caching="{engine.block_manager.enable_prefix_caching}"' in key
    assert f'max_model_len="{engine.max_model_len}"' in key


def test_metrics_agree_with_a_known_batch_of_traffic(api_server):
    client = api_server.openai()
    model = api_server.engine.model_name
    assert wait_for(lambda: api_server.engine.stats().num_running == 0)
    before = api_server.metrics()

    prompt_tokens = completion_tokens = sequence_prompt_tokens = 0
    decode_lengths: list[int] = []  # context length of every decode step (known for greedy, no stop)

    def account(usage, n=1):
        nonlocal prompt_tokens, completion_tokens, sequence_prompt_tokens
        prompt_tokens += usage.prompt_tokens
        sequence_prompt_tokens += n * usage.prompt_tokens
        completion_tokens += usage.completion_tokens
        per_seq = usage.completion_tokens // n
        # The first token comes from the prefill; each later one is one decode step over P + k tokens.
        decode_lengths.extend([usage.prompt_tokens + k for k in range(1, per_seq)] * n)

    # 3 chats, cut by length
    for i in range(3):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": f"Question {i}?"}],
                                           max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].finish_reason == "length"
        account(r.usage)
    # 2 streamed completions with n = 2: 4 sequences cut by length
    for prompt in ("Alpha beta", "Gamma delta epsilon"):
        chunks = list(client.completions.create(model=model, prompt=prompt, n=2, max_tokens=4, stream=True,
                                                stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        assert sorted(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason) \
            == ["length", "length"]
        account(chunks[-1].usage, n=2)
    # 1 completion ended by a stop string (greedy text, stop taken from its middle)
    base = client.completions.create(model=model, prompt="Stop here", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    account(base.usage)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = client.completions.create(model=model, prompt="Stop here", max_tokens=16, temperature=0,
                                        stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].finish_reason == "stop"
    prompt_tokens += stopped.usage.prompt_tokens
    sequence_prompt_tokens += stopped.usage.prompt_tokens
    completion_tokens += stopped.usage.completion_tokens
    # 1 refused request (400): counted by HTTP status only
    with api_server.http() as h:
        assert h.post("/v1/completions", json={"prompt": "x", "temperature": 9}).status_code == 400

    assert wait_for(lambda: api_server.engine.stats().num_running == 0)
    after = api_server.metrics()
    d = lambda key: delta(after, before, key)  # noqa: E731

    assert d('nsa:request_success_total{finished_reason="length"}') == 3 + 4 + 1
    assert d('nsa:request_success_total{finished_reason="stop"}') == 1
    assert d('nsa:request_success_total{finished_reason="abort"}') == 0
    assert d('nsa:request_success_total{finished_reason="error"}') == 0
    assert d("nsa:prompt_tokens_total") == prompt_tokens
    assert d("nsa:generation_tokens_total") == completion_tokens
    assert d("nsa:request_prompt_tokens_count") == 7  # engine requests
    assert d("nsa:request_prompt_tokens_sum") == prompt_tokens
    assert d("nsa:request_generation_tokens_count") == 9  # sequences
    assert d("nsa:request_generation_tokens_sum") == completion_tokens
    for hist in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert d(f"nsa:{hist}_count") == 7, hist
    # every token after a sequence's first is one inter-token interval
    assert d("nsa:inter_token_latency_seconds_count") == completion_tokens - 9
    assert d("nsa:request_inference_time_seconds_count") == 7
    assert d("nsa:request_time_per_output_token_seconds_count") == 6 + (stopped.usage.completion_tokens > 1)
    assert d("nsa:request_params_n_count") == 7 and d("nsa:request_params_n_sum") == 3 + 2 * 2 + 1 + 1
    assert d("nsa:request_params_max_tokens_sum") == 3 * 5 + 2 * 4 + 16 + 16
    # Every token an engine step computed: each sequence's prompt less its prefix-cache hits, and
    # its tokens after the first (the last sampled token is never fed back). In steps of 1..2**20.
    computed = sequence_prompt_tokens - d("nsa:prefix_cache_hits_total") + completion_tokens - 9
    assert d("nsa:iteration_tokens_total_sum") == computed
    steps = d('nsa:iteration_tokens_total_bucket{le="+Inf"}')
    assert d("nsa:iteration_tokens_total_count") == steps and computed / 1024 <= steps <= computed
    assert d('nsa:iteration_tokens_total_bucket{le="1.0"}') >= 1  # decode steps of one sequence
    assert after['nsa:iteration_tokens_total_bucket{le="1048576.0"}'] == after["nsa:iteration_tokens_total_count"]
    assert d('nsa:http_requests_total{route="/v1/chat/completions",status="200"}') == 3
    assert d('nsa:http_requests_total{route="/v1/completions",status="200"}') == 4
    assert d('nsa:http_requests_total{route="/v1/completions",status="400"}') == 1
    # NSA's own counters, for the requests whose decode steps are known (the stop-cut one is not)
    stop_decodes = [stopped.usage.prompt_tokens + k for k in range(1, stopped.usage.completion_tokens)]
    lengths = decode_lengths + stop_decodes
    assert d("nsa:kv_tokens_dense_equivalent_total") == sum(lengths)
    sparsity = api_server.engine.config.sparsity
    assert d("nsa:kv_tokens_read_total") == sum(tokens_read_per_step(L, sparsity) for L in lengths)
    # the same prompt twice: the prefix cache was asked, and every hit is a looked-up token
    assert d("nsa:prefix_cache_queries_total") >= d("nsa:prefix_cache_hits_total") >= 0
    assert after["nsa:num_requests_running"] == after["nsa:num_requests_waiting"] == 0
    assert after["nsa:kv_cache_usage_perc"] == 0


def test_metrics_need_the_api_key(api_server):
    with httpx.Client(base_url=api_server.url) as h:
        assert h.get("/metrics").status_code == 401


def test_garbage_collections_are_timed_by_generation(api_server):
    # The server's lifespan installs the collector's timer: a full collection in this process (the
    # test server's) shows up as one more generation-2 pause.
    import gc

    key = 'nsa:gc_pause_seconds_count{generation="2"}'
    before = api_server.metrics()
    gc.collect()
    after = api_server.metrics()
    assert delta(after, before, key) >= 1
    assert after['nsa:gc_pause_seconds_bucket{generation="2",le="+Inf"}'] == after[key]
    assert delta(after, before, 'nsa:gc_pause_seconds_sum{generation="2"}') > 0
