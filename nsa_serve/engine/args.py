"""Engine settings shared by `nsa-serve serve`, the offline benchmark and tests."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace


def add_graph_args(parser) -> None:
    """The CUDA-graph and scheduling flags `serve` and `bench` share (EngineArgs fields of the
    same names)."""
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--piecewise-max-tokens", type=int, default=2048,
                        help="prompt and mixed steps of up to this many tokens replay as CUDA graphs: "
                             "the work between attention calls, the decode rows' attention, and the "
                             "prompt chunks' up to 512 tokens (0: eager; CUDA only)")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                        help="queue each decode step before reading the previous step's tokens, so the "
                             "host's work overlaps the GPU's (decode steps served by CUDA graphs; default: "
                             "on with CUDA, off on CPU)")


SPECULATIVE_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")


def speculative_config(text: str) -> dict:
    """--speculative-config: vLLM's JSON object, as EngineArgs fields (speculative_fields)."""
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}") from None
    try:
        return speculative_fields(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# vLLM engine options a vLLM command line or `LLM(...)` call may carry, with the values each may
# have here, where they mean what this engine does anyway (check_vllm_options).
VLLM_OPTIONS = {"tensor_parallel_size": (1,), "pipeline_parallel_size": (1,), "data_parallel_size": (1,),
                "kv_cache_dtype": ("auto",), "quantization": (None,), "tool_call_parser": (None, "nsa")}
# ... and those that change nothing here whatever their value (chunked prefill and "auto" tool
# choice are always on; a model directory holds no code).
VLLM_NO_OP_OPTIONS = ("enable_chunked_prefill", "enable_auto_tool_choice", "trust_remote_code")


def check_vllm_options(values: dict, spell=lambda name: name) -> None:
    """ValueError with the reason for a vLLM option this engine cannot honour; `spell` writes an
    option's name as the caller's user wrote it (a flag, a keyword argument)."""
    why = {"tensor_parallel_size": "this server runs a model on one GPU (multi-GPU serving is not supported); "
                                   "run one server a GPU behind a load balancer",
           "kv_cache_dtype": "the KV cache holds the model's dtype (quantized caches are not supported); "
                             "leave it at auto",
           "quantization": "quantized weights are not supported",
           "tool_call_parser": "this server parses the model's tool calls in its own format (a JSON list, the "
                               "one its template shows the model: docs/api.md), named 'nsa'; leave it out"}
    why["pipeline_parallel_size"] = why["data_parallel_size"] = why["tensor_parallel_size"]
    for name, allowed in VLLM_OPTIONS.items():
        value = values.get(name, allowed[0])
        if value not in allowed:
            raise ValueError(f"{spell(name)} {value}: {why[name]}")


def speculative_fields(config) -> dict:
    """vLLM's speculative_config (a dict) as EngineArgs fields; of its methods, "ngram" is built."""
    if not isinstance(config, dict):
        raise ValueError(f"speculative config: expected a JSON object, got {config!r}")
    unknown = sorted(set(config) - set(SPECULATIVE_KEYS))
    if unknown:
        raise ValueError(f"speculative config: unknown keys {unknown}; known: {list(SPECULATIVE_KEYS)}")
    if config.get("method") != "ngram":
        raise ValueError(f"speculative config: method {config.get('method')!r} is not built; the one method "
                         "here is 'ngram' (drafts need no second model)")
    for key in SPECULATIVE_KEYS[1:]:
        if key in config and (not isinstance(config[key], int) or isinstance(config[key], bool)):
            raise ValueError(f"speculative config: {key} must be an integer, got {config[key]!r}")
    if "num_speculative_tokens" not in config:
        raise ValueError("speculative config: num_speculative_tokens is required")
    out = {k: config[k] for k in SPECULATIVE_KEYS[1:] if k in config}
    if "prompt_lookup_max" in out and "prompt_lookup_min" not in out:
        out["prompt_lookup_min"] = min(2, out["prompt_lookup_max"])
    return out


@dataclass
class EngineArgs:
    model: str | None = None  # model directory; None: the bundled default model
    device: str | None = None  # "cpu" | "cuda" | None (cuda when available)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attention: str = "nsa"  # "nsa" | "dense" (dense attention over the same pages, for comparisons)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int | None = None  # token budget of one engine step; None: by device
    long_prefill_token_threshold: int | None = None  # per-request prefill chunk cap; None: by device
    max_queue: int = 256  # waiting requests before new ones get QueueFullError (HTTP 429)
    # vLLM's --max-logprobs: the most alternatives a request may ask logprobs (or prompt logprobs)
    # for; -1: the whole vocabulary. Beam search asks for 2 × its width.
    max_logprobs: int = 20
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + cache
    cpu_kv_cache_gb: float = 1.0  # page pool size on CPU
    num_pages: int | None = None  # force the page pool size (tests use this to force preemption)
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority"
    enforce_eager: bool = False  # True: no CUDA graphs
    # Prompt and mixed steps of up to this many tokens replay the work between attention calls as
    # CUDA graphs (engine/piecewise_graphs.py; vLLM's piecewise graphs), and their attention from
    # graphs of its own where they can (piecewise_decode.py, piecewise_prefill.py); 0: eager.
    # CUDA only; capped at max_num_batched_tokens.
    piecewise_max_tokens: int = 2048
    # Decode steps served by the fixed-shape path are queued before the previous step's tokens are
    # read, so the host's bookkeeping overlaps the device (vLLM's async scheduling, SGLang's overlap
    # scheduler). Rows whose sampling depends on their tokens (grammar, penalties, min_tokens not
    # reached) run synchronously. None: on with CUDA graphs, off on CPU (`resolved`).
    async_scheduling: bool | None = None
    # CPU only: intra-op threads of engine steps (None: torch's default, one per core), and cores
    # left free for the API server's threads during steps of several decoding sequences (under
    # llm_engine.CPU_BIG_STEP_TOKENS tokens); the HTTP server reserves 1 by default, as vLLM's CPU
    # backend reserves a core for its frontend.
    cpu_threads: int | None = None
    cpu_reserved_cores: int = 0
    seed: int = 0
    # Context length of a start-up workload run for real (0: none): prompts whose chunks walk every
    # context class (docs/engine.md). `precompile` compiles those classes without running them;
    # this also finishes any other lazy initialisation, at 25–36 s of start-up at 64k on an H200.
    warmup_context: int = 0
    # CUDA: compile the Triton kernel variants of every eager step shape at start-up (synthetic
    # steps that only compile, engine/precompile.py), so the first requests do not pay for them:
    # ~10 s of TTFT over the first 8 × 64k requests on an H200 with an empty Triton cache.
    precompile: bool = True
    # Speculative decoding by n-gram lookup (vLLM's --speculative-config method "ngram"): up to this
    # many draft tokens a step per sequence (0: off), taken after the latest earlier occurrence of
    # the sequence's last n tokens, n from prompt_lookup_max down to prompt_lookup_min
    # (engine/speculative.py). Shared-K/V models; turns async scheduling off.
    num_speculative_tokens: int = 0
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    # Defaults of the step budget and the prefill chunk, by device (`resolved`).
    GPU_BUDGET = 8192
    CPU_BUDGET = 2048
    CPU_CHUNK = 512
    RING_CHUNK = 2048  # CUDA, independent K/V

    def resolved(self, device_type: str, shared_kv: bool = True) -> "EngineArgs":
        """A copy with the step budget and the prefill chunk cap filled in for this device type
        (explicit settings win; the chunk never exceeds the budget).

        CUDA: 8192 tokens a step, chunks up to the whole budget, as vLLM's and SGLang's servers do
        on H100-class GPUs. An eager prefill step launches ~600 kernels from Python, so small chunks
        are bound by the host, not the GPU. Measured on an H200, paper-1b, one 64k prompt
        (docs/benchmarks/engine.md, thirtieth engine round): 512-token chunks took 32 ms a step for
        ~13 ms of GPU work and 4.1–5.3 s to the first token; 2048-token chunks 1.23–1.31 s; 8192
        1.15–1.21 s. Eight 64k prompts at once: mean / max TTFT 6.18 / 10.96 s with 2048-token
        steps, 5.47 / 9.57 s with 8192. The price: a decode row beside an 8192-token chunk waits
        for its ~160 ms step (lower the budget to trade TTFT for inter-token latency).
        Independent-K/V models on CUDA: chunks of at most 2048 tokens (1.23–1.31 s above), since
        each running sequence keeps a private window ring of w + chunk − 1 tokens
        (`model_runner.ring_pages`): 40 pages instead of 136 at w = 512.
        CPU: steps are compute-bound; 2048 a step in chunks of 512 keep decode steps short.

        Async scheduling: on for CUDA, where decode steps replay CUDA graphs and the host's work per
        step is a large share of the step (vLLM's default since 0.14, SGLang's overlap scheduler);
        paper-1b decode +26 % at 8 × 64k and +52 % at 64 × 1k on an H200 (thirtieth engine round).
        Off on CPU, where the fixed-shape path does not exist and nothing could overlap."""
        cuda = device_type == "cuda"
        budget = self.max_num_batched_tokens
        if budget is None:
            budget = self.GPU_BUDGET if cuda else self.CPU_BUDGET
        chunk = self.long_prefill_token_threshold
        if chunk is None:
            chunk = (budget if shared_kv else min(budget, self.RING_CHUNK)) if cuda else self.CPU_CHUNK
        # Speculation reads each step's tokens before proposing the next drafts: nothing to overlap.
        overlap = (cuda and not self.num_speculative_tokens) if self.async_scheduling is None else self.async_scheduling
        return replace(self, max_num_batched_tokens=budget, long_prefill_token_threshold=min(chunk, budget),
                       async_scheduling=overlap)

    def validate(self) -> None:
        if self.attention not in ("nsa", "dense"):
            raise ValueError(f"attention must be 'nsa' or 'dense', got {self.attention!r}")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError("cpu_threads must be >= 1")
        if self.cpu_reserved_cores < 0:
            raise ValueError("cpu_reserved_cores must be >= 0")
        if self.piecewise_max_tokens < 0:
            raise ValueError("piecewise_max_tokens must be >= 0")
        if self.warmup_context < 0:
            raise ValueError("warmup_context must be >= 0")
        if not -2**63 <= self.seed < 2**63:  # what a torch generator takes (and a request's seed)
            raise ValueError(f"seed must be between -2**63 and 2**63 - 1, got {self.seed}")
        if not 0 <= self.num_speculative_tokens <= 64:
            raise ValueError(f"num_speculative_tokens must be in [0, 64], got {self.num_speculative_tokens}")
        if self.num_speculative_tokens:
            if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
                raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} "
                                 f"and {self.prompt_lookup_max}")
            if self.async_scheduling:
                raise ValueError("speculative decoding runs without async scheduling (each step's drafts "
                                 "come from the tokens the step before sampled); drop --async-scheduling")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be -1 (the vocabulary) or >= 0, got {self.max_logprobs!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold", "max_queue"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
