"""Engine settings shared by `nsa-serve serve`, the offline benchmark and tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineArgs:
    model: str | None = None  # model directory; None: the bundled default model
    device: str | None = None  # "cpu" | "cuda" | None (cuda when available)
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attention: str = "nsa"  # "nsa" | "dense" (dense attention over the same pages, for comparisons)
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # token budget of one engine step
    long_prefill_token_threshold: int = 512  # per-request prefill chunk cap per step
    max_queue: int = 256  # waiting requests before new ones get QueueFullError (HTTP 429)
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory for weights + cache
    cpu_kv_cache_gb: float = 1.0  # page pool size on CPU
    num_pages: int | None = None  # force the page pool size (tests use this to force preemption)
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # "fcfs" | "priority"
    enforce_eager: bool = False  # True: no CUDA graphs
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
        if self.warmup_context < 0:
            raise ValueError("warmup_context must be >= 0")
        for name in ("max_num_seqs", "max_num_batched_tokens", "long_prefill_token_threshold", "max_queue"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
