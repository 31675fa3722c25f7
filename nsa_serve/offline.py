"""Offline batched inference, as vLLM's `LLM` class offers it:

    from nsa_serve import LLM, SamplingParams

    llm = LLM()  # the bundled default model; LLM("/models/my-nsa", max_model_len=32768) for another
    for out in llm.generate(["def fib(n):", "The capital of"], SamplingParams(temperature=0, max_tokens=32)):
        print(out.outputs[0].text)
    llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=64))

The same engine the server runs (continuous batching, paged NSA cache, CUDA graphs on a GPU), driven
in this thread until every prompt is done. Outputs are `RequestOutput`s, in prompt order.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

from .engine.args import VLLM_NO_OP_OPTIONS, VLLM_OPTIONS, EngineArgs, check_vllm_options, speculative_fields
from .engine.llm_engine import LLMEngine
from .engine.protocol import InvalidRequestError, RequestOutput, SamplingParams
from .chat_template import compile_template

Prompt = str | list[int] | dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, speculative_config: dict | None = None, **engine_args: Any):
        """`model`: a model directory (default: the bundled model); `engine_args`: EngineArgs fields
        (max_model_len, device, dtype, max_num_seqs, enforce_eager, seed, ...); `speculative_config`:
        vLLM's, e.g. {"method": "ngram", "num_speculative_tokens": 4} (docs/engine.md). vLLM's
        `tensor_parallel_size=1`, `kv_cache_dtype="auto"`, `trust_remote_code`, ... are taken where
        their value is what this engine does anyway, and are a ValueError saying why otherwise."""
        vllm = {k: engine_args.pop(k) for k in (*VLLM_OPTIONS, *VLLM_NO_OP_OPTIONS) if k in engine_args}
        check_vllm_options(vllm)
        if speculative_config is not None:
            engine_args.update(speculative_fields(speculative_config))
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self.engine.warmup()  # captures the CUDA graphs on a GPU; a short step on a CPU

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt: a string (tokenized with the BOS token), a list of token ids, or
        {"prompt": str} / {"prompt_token_ids": [...]}. One SamplingParams for all, or one each.
        `use_tqdm` (vLLM's): a progress bar on stderr over the finished prompts."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self._token_ids(p) for p in prompts]
        return self._run(ids, sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template: str | None = None, chat_template_kwargs: dict[str, Any] | None = None,
             chat_template_content_format: str = "auto", use_tqdm: bool = True,
             tools: list[dict] | None = None) -> list[RequestOutput]:
        """Reply to one conversation (a list of {"role", "content"} messages) or to several.
        `chat_template`: a Jinja template's text in place of the model's (vLLM's argument);
        `chat_template_kwargs`: extra variables for the template; `chat_template_content_format`:
        how a Jinja template gets each message's content ("auto", "string", "openai": vLLM's);
        `use_tqdm` as in `generate`; `tools`: OpenAI function tools shown to the model as the server
        shows them (a Jinja template gets them as `tools`, the built-in one in a system turn before
        the conversation). The replies are text: parse any calls in them yourself, as with vLLM."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self._tokenizer()
        ids = []
        try:
            template = compile_template(chat_template) if chat_template is not None else None
            shown = self._tools_turn(tools) if tools else []  # checked whichever template shows them
            # The built-in template gets the tools as that system turn, a Jinja template as `tools`.
            tools_turn = shown if (template or tok.chat_template) is None else []
            for conv in conversations:
                text = tok.apply_chat_template(tools_turn + list(conv), add_generation_prompt, continue_final_message,
                                               chat_template=template, template_kwargs=chat_template_kwargs,
                                               content_format=chat_template_content_format,
                                               tools=tools if tools and not tools_turn else None)
                ids.append(tok.encode_chat(text, template))
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param=getattr(exc, "param", "messages")) from None
        return self._run(ids, sampling_params, use_tqdm)

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _tools_turn(tools: list[dict]) -> list[dict]:
        """The built-in template's system turn showing `tools` (the HTTP server's: api/tools.py)."""
        from .api.errors import APIError
        from .api.tools import parse_tools, tools_system_text

        try:
            return [{"role": "system", "content": tools_system_text(parse_tools(tools))}]
        except APIError as exc:
            raise InvalidRequestError(exc.message, param="tools") from None
    def _tokenizer(self):
        if self.engine.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer.model: give prompts as token ids")
        return self.engine.tokenizer

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return list(prompt["prompt_token_ids"])
            prompt = prompt.get("prompt")
        if isinstance(prompt, str):
            return self._tokenizer().encode(prompt)
        if isinstance(prompt, list):
            return list(prompt)
        raise InvalidRequestError(f"a prompt is a string, a list of token ids, or a dict with 'prompt' or "
                                  f"'prompt_token_ids'; got {type(prompt).__name__}", param="prompt")

    def _run(self, ids: list[list[int]], sampling_params, use_tqdm: bool = True) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            plist = [sampling_params or SamplingParams()] * len(ids)
        else:
            plist = list(sampling_params)
            if len(plist) != len(ids):
                raise InvalidRequestError(f"{len(plist)} SamplingParams for {len(ids)} prompts")
        # Only the final output of each request is wanted: the engine builds no others.
        plist = [dataclasses.replace(p, output_kind="final_only") if p.output_kind == "cumulative" else p
                 for p in plist]
        if not use_tqdm:
            return self.engine.generate(ids, plist)
        from tqdm import tqdm

        # As vLLM's: finished prompts, and the tokens a second so far (prompt tokens in, completion
        # tokens out).
        start, tokens_in, tokens_out = time.perf_counter(), 0, 0
        with tqdm(total=len(ids), desc="Processed prompts", unit="prompt", dynamic_ncols=True) as bar:
            def finished(out: RequestOutput) -> None:
                nonlocal tokens_in, tokens_out
                tokens_in += len(out.prompt_token_ids)
                tokens_out += sum(len(c.token_ids) for c in out.outputs)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"input: {tokens_in / elapsed:.1f} toks/s, output: {tokens_out / elapsed:.1f} toks/s",
                                    refresh=False)
                bar.update(1)

            return self.engine.generate(ids, plist, on_finished=finished)
