"""OpenAI request and response models (pydantic), and their translation to engine `SamplingParams`.

Requests are validated in strict mode: a string where a number belongs, or `true` where an integer
belongs, is a 400 (as the OpenAI API answers), never a silent conversion. Unknown fields are ignored
(clients send provider-specific extras), known-but-unsupported ones (`suffix`, `functions`, audio
output, `logits_processors`, ...: `_refused`) are rejected with a message naming them, so nobody
believes they took effect.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..engine.protocol import SamplingParams
from .beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from ..engine.structured import StructuredOutput
from .errors import bad_request
from .tools import Tool, ToolPlan, parse_tools, plan_tool_calls, render_tool_calls

_REQUEST_CONFIG = ConfigDict(strict=True, extra="ignore")


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries its choice's usage so far.
    continuous_usage_stats: bool = False

    @property
    def continuous(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


class _SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extras)."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extra sampling parameters
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    cache_salt: str | None = None
    prompt_logprobs: int | None = None
    priority: int = 0
    # vLLM's: keep only the prompt's last k tokens (-1: the context length), for long documents
    # whose start may be cut.
    truncate_prompt_tokens: int | None = None
    skip_special_tokens: bool = True
    # vLLM's: logprobs name tokens "token_id:N" instead of by their text.
    return_tokens_as_token_ids: bool | None = None  # None: the server's --return-tokens-as-token-ids
    # vLLM's: the response carries the prompt's token ids and each choice's (what RL trainers
    # score, without tokenizing the text again).
    return_token_ids: bool = False
    # vLLM's: the request's id (the response's id after its prefix) when no X-Request-Id header gives one
    request_id: str | None = None
    # vLLM's beam search (api/beam_search.py): n beams, ranked by cum_logprob / length ** length_penalty.
    use_beam_search: bool = False
    length_penalty: float = 1.0
    # Structured output: OpenAI's response_format, vLLM's guided_* fields and its newer
    # structured_outputs object ({"json" | "regex" | "choice" | "grammar" | "json_object": ...}).
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM fields this server cannot honour: declared so that a request naming them gets a 400
    # (`_refused`) instead of having them dropped as unknown extras.
    logits_processors: Any = None
    structural_tag: Any = None
    guided_whitespace_pattern: Any = None

    def _refused(self) -> list[tuple[str, bool, str]]:
        """(field, given, why) for the fields a request may name that this server cannot honour."""
        return [("logits_processors", self.logits_processors is not None,
                 "logits_processors (custom logits processors) are not supported by this server"),
                ("structural_tag", self.structural_tag is not None,
                 "structural_tag is not supported by this server: use response_format, guided_json, guided_regex, "
                 "guided_choice, guided_grammar or structured_outputs"),
                ("guided_whitespace_pattern", self.guided_whitespace_pattern is not None,
                 "guided_whitespace_pattern is not supported by this server")]

    def _structured(self) -> StructuredOutput | None:
        """The one output constraint the request names, or None; 400 for two or a malformed one."""
        found = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type", "text")
            if kind == "json_object":
                found.append(StructuredOutput("json_object", None, "response_format"))
            elif kind == "json_schema":
                js = rf.get("json_schema")
                schema = js.get("schema") if isinstance(js, dict) else None
                if not isinstance(schema, dict):
                    raise bad_request("response_format json_schema needs json_schema.schema, a JSON schema object",
                                      param="response_format")
                found.append(StructuredOutput("json", schema, "response_format"))
            elif kind != "text":
                raise bad_request(f"response_format type must be text, json_object or json_schema, got {kind!r}",
                                  param="response_format")
        for kind, value in (("json", self.guided_json), ("regex", self.guided_regex),
                            ("choice", self.guided_choice), ("grammar", self.guided_grammar)):
            if value is not None:
                found.append(StructuredOutput(kind, value, f"guided_{kind}"))
        for key, value in (self.structured_outputs or {}).items():
            if key not in ("json", "regex", "choice", "grammar", "json_object"):
                raise bad_request(f"structured_outputs.{key} is not supported (json, regex, choice, grammar, "
                                  f"json_object are)", param="structured_outputs")
            if key == "json_object":
                if value:
                    found.append(StructuredOutput("json_object", None, "structured_outputs"))
            elif value is not None:
                found.append(StructuredOutput(key, value, "structured_outputs"))
        if len(found) > 1:
            raise bad_request("give one output constraint (response_format, guided_json, guided_regex, guided_choice, "
                              "guided_grammar or structured_outputs), not several", param=found[1].param)
        return found[0] if found else None

    def _check_common(self) -> None:
        for name, given, why in self._refused():
            if given:
                raise bad_request(why, param=name)
        if self.prompt_logprobs is not None and self.stream:
            raise bad_request("prompt_logprobs is not available with stream=true", param="prompt_logprobs")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true", param="stream_options")

    def _beam_search_params(self, max_tokens: int, logprobs_asked: bool) -> BeamSearchParams:
        """What a beam search needs; a 400 naming any field it cannot honour (a search ranks the
        model's own log-probabilities, so whatever would change them has no place in it)."""
        self._check_common()
        if not 1 <= self.n <= MAX_BEAM_WIDTH:
            raise bad_request(f"n (the beam width) must be between 1 and {MAX_BEAM_WIDTH} with use_beam_search, "
                              f"got {self.n}", param="n")
        if not (math.isfinite(self.length_penalty) and -10 <= self.length_penalty <= 10):
            raise bad_request(f"length_penalty must be between -10 and 10, got {self.length_penalty}",
                              param="length_penalty")
        unsupported = [
            ("stop", bool(self.stop)), ("logit_bias", bool(self.logit_bias)),
            ("allowed_token_ids", self.allowed_token_ids is not None), ("bad_words", bool(self.bad_words)),
            ("presence_penalty", self.presence_penalty != 0), ("frequency_penalty", self.frequency_penalty != 0),
            ("repetition_penalty", self.repetition_penalty not in (None, 1.0)), ("min_tokens", self.min_tokens != 0),
            ("logprobs", logprobs_asked), ("prompt_logprobs", self.prompt_logprobs is not None)]
        for name, given in unsupported:
            if given:
                raise bad_request(f"{name} is not supported with use_beam_search", param=name)
        constraint = self._structured()
        if constraint is not None:
            raise bad_request(f"{constraint.param} is not supported with use_beam_search", param=constraint.param)
        params = BeamSearchParams(width=self.n, max_tokens=max_tokens, length_penalty=self.length_penalty,
                                  ignore_eos=self.ignore_eos, stop_token_ids=tuple(self.stop_token_ids or ()),
                                  skip_special_tokens=self.skip_special_tokens, cache_salt=self.cache_salt)
        # The shared checks (stop_token_ids, cache_salt, ...) through the engine's own validation.
        SamplingParams(n=self.n, max_tokens=max_tokens, stop_token_ids=list(params.stop_token_ids),
                       cache_salt=self.cache_salt).validate()
        return params

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         defaults: dict[str, Any], prompt_logprobs: int | None = None,
                         structured: StructuredOutput | None = None) -> SamplingParams:
        """The engine parameters; `defaults` (the model's generation_config.json) fill what the
        request leaves out, as vLLM does. `structured`: a constraint from elsewhere (tool calls),
        which may not be combined with one of the request's own."""

        def pick(name, fallback):
            value = getattr(self, name)
            if value is not None:
                return value
            return defaults.get(name, fallback)

        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = SamplingParams(
            n=self.n, temperature=pick("temperature", 1.0), top_p=pick("top_p", 1.0), top_k=pick("top_k", 0),
            min_p=pick("min_p", 0.0), presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=pick("repetition_penalty", 1.0),
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output, skip_special_tokens=self.skip_special_tokens,
            logit_bias=_token_bias(self.logit_bias), allowed_token_ids=self.allowed_token_ids,
            bad_words=list(self.bad_words or []), cache_salt=self.cache_salt,
            prompt_logprobs=self.prompt_logprobs if prompt_logprobs is None else prompt_logprobs,
            structured=_one_constraint(structured, self._structured()),
            # A stream needs only what each output adds; a plain response only the last output.
            output_kind="delta" if self.stream else "final_only")
        # InvalidRequestError -> 400 naming the field. The logprobs bound is the engine's
        # (--max-logprobs), checked as it admits the request (still before any answer starts).
        params.validate(max_logprobs=None)
        return params


def _one_constraint(tools: StructuredOutput | None, own: StructuredOutput | None) -> StructuredOutput | None:
    if tools is not None and own is not None:
        raise bad_request(f"a tool call is already a constrained output: drop {own.param} or use tool_choice "
                          "\"none\"", param=own.param)
    return tools or own


def _token_bias(bias: dict[str, float] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as JSON object keys, so strings) with integer keys."""
    out = {}
    for key, value in (bias or {}).items():
        try:
            out[int(key)] = value
        except ValueError:
            raise bad_request(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
    return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: false tokenizes a text prompt without BOS

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            out = [p]
        elif not p:
            raise bad_request("prompt must not be empty", param="prompt")
        elif isinstance(p[0], int):
            out = [p]
        else:
            out = list(p)
        if any(len(x) == 0 for x in out):
            raise bad_request("prompt must not be empty", param="prompt")
        return out

    def to_beam_search_params(self, max_tokens: int) -> BeamSearchParams:
        self._check_unsupported()
        return self._beam_search_params(max_tokens, self.logprobs is not None)

    def _check_unsupported(self) -> None:
        if self.suffix:
            raise bad_request("suffix is not supported by this server", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of must be equal to n (beam-like best_of is not supported)", param="best_of")

    def to_sampling_params(self, max_tokens: int | None, defaults: dict[str, Any]) -> SamplingParams:
        self._check_common()
        self._check_unsupported()
        prompt_logprobs = None
        if self.echo and self.logprobs is not None:
            # The echoed prompt's tokens get logprobs too (what evaluation harnesses score with).
            if not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or self.logprobs < 0:
                raise bad_request(f"logprobs must be a non-negative integer, got {self.logprobs!r}", param="logprobs")
            prompt_logprobs = max(self.logprobs, self.prompt_logprobs or 0)
        return self._sampling_params(max_tokens, self.logprobs, defaults, prompt_logprobs)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool result's call

    def text(self) -> str | None:
        """The content as one string: text parts joined (a 400 for any other kind of part)."""
        if not isinstance(self.content, list):
            return self.content
        bad = [p.type for p in self.content if p.type != "text"]
        if bad:
            raise bad_request(f"only text content parts are supported, got {bad[0]!r}", param="messages")
        if any(p.text is None for p in self.content):
            raise bad_request("a text content part needs its 'text' string", param="messages")
        return "".join(p.text for p in self.content)

    def as_template_dict(self) -> dict:
        """The message as the built-in template takes it (tokenizer.render_chat)."""
        content = self.text()
        if self.tool_calls:  # shown as the JSON a "required" tool choice generates (api/tools.py)
            content = (content or "") + render_tool_calls(self.tool_calls)
        # OpenAI's newer "developer" role is the system role of older models.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}

    def as_jinja_dict(self) -> dict:
        """The message as a Jinja chat template sees it (vLLM's shape): content as sent, text parts
        kept apart (the template renders it in its content format: chat_template._with_content),
        roles as sent, earlier tool calls kept as a list with their arguments parsed from JSON where
        they are JSON (templates write them with tojson), and the tool result's call id and name."""
        self.text()  # the 400 for parts other than text
        content = [{"type": "text", "text": p.text} for p in self.content] if isinstance(self.content, list) \
            else self.content
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [_jinja_tool_call(c) for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _jinja_tool_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"])
    if isinstance(fn.get("arguments"), str):
        try:
            fn["arguments"] = json.loads(fn["arguments"])
        except ValueError:
            pass  # not JSON: the template gets the string
    return {**call, "function": fn}


def check_continuation(req: ChatCompletionRequest | TokenizeRequest) -> None:
    """vLLM's rule: a final message is continued only without a new assistant turn after it."""
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true: set "
                          "add_generation_prompt to false to continue the final message",
                          param="continue_final_message")


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    echo: bool = False  # vLLM's: a reply in the last message's role starts with that message's text
    # vLLM's: a Jinja template for this request (with --trust-request-chat-template) and extra
    # variables for whichever template renders (nsa_serve/chat_template.py)
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None  # Hugging Face's RAG documents, for a Jinja template
    # OpenAI fields a text-only server without tools of its own cannot honour (`_refused`).
    functions: Any = None
    function_call: Any = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None

    def _refused(self) -> list[tuple[str, bool, str]]:
        return super()._refused() + [
            ("functions", self.functions is not None,
             "functions (OpenAI's deprecated function calling) are not supported: use tools and tool_choice"),
            ("function_call", self.function_call is not None,
             "function_call (OpenAI's deprecated function calling) is not supported: use tools and tool_choice"),
            ("modalities", any(m != "text" for m in self.modalities or []),
             "this server writes text only: modalities may only hold \"text\""),
            ("audio", self.audio is not None, "this server writes text only: audio output is not supported"),
            ("web_search_options", self.web_search_options is not None,
             "web search is not supported by this server")]

    def requested_max_tokens(self) -> int | None:
        # max_completion_tokens is OpenAI's newer name and wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_plan(self) -> tuple[list[Tool], ToolPlan | None]:
        """The request's tools and how its reply becomes tool calls (api/tools.py)."""
        tools = parse_tools(self.tools)
        return tools, plan_tool_calls(tools, self.tool_choice, self.parallel_tool_calls)

    def to_beam_search_params(self, max_tokens: int, plan: ToolPlan | None) -> BeamSearchParams:
        if plan is not None:
            raise bad_request("tool calls are not supported with use_beam_search", param="tool_choice")
        return self._beam_search_params(max_tokens, self.logprobs)

    def to_sampling_params(self, max_tokens: int | None, defaults: dict[str, Any],
                           plan: ToolPlan | None = None) -> SamplingParams:
        self._check_common()
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
            if self.top_logprobs < 0:  # the upper bound: the engine's --max-logprobs
                raise bad_request(f"top_logprobs must be a non-negative integer, got {self.top_logprobs}",
                                  param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, defaults,
                                     structured=plan.structured if plan is not None else None)


class TokenizeRequest(BaseModel):
    model_config = _REQUEST_CONFIG
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # as in a chat request, so that /tokenize counts what /v1/chat/completions would run
    tools: list[Any] | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None


class DetokenizeRequest(BaseModel):
    model_config = _REQUEST_CONFIG
    model: str | None = None
    tokens: list[int]


# -- responses ---------------------------------------------------------------------------------------

class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served by the prefix cache


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # OpenAI's: set in a response's usage and a stream's final usage chunk, not in the
    # continuous_usage_stats chunks (vLLM's way).
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):
    """vLLM's shape of one prompt_logprobs entry: {token_id: {logprob, rank, decoded_token}}."""
    logprob: float
    rank: int | None = None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]


def _unless_asked() -> Any:
    """A field left out of the JSON while None (return_token_ids), so that answers to requests that
    did not ask look as before; pydantic's exclude_if keeps serialization on its compiled path (a
    wrapping serializer doubled a stream chunk's serialization time)."""
    return Field(default=None, exclude_if=lambda v: v is None)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = _unless_asked()  # return_token_ids: in a choice's first chunk when streamed
    token_ids: list[int] | None = _unless_asked()  # return_token_ids: the choice's (a chunk's: that chunk's) tokens


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _unless_asked()  # return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = _unless_asked()  # return_token_ids


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler):
        # OpenAI sends only what a delta carries: {"content": "..."}, and {} on a bare finish chunk.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    token_ids: list[int] | None = _unless_asked()  # return_token_ids: the tokens since the choice's last chunk


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = _unless_asked()  # return_token_ids: in the first chunk


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nsa-serve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
