"""vLLM's `bad_words`: words the sampler never lets a completion write, as token sequences.

A word is banned as the token sequence(s) the tokenizer writes it with at the start of a word. The
sampler bans a sequence's last token whenever the completion's generated tokens end with the rest
of it (a one-token word: always). As in vLLM, this bans those token sequences, not the text: the
same word spelled with other tokens (or begun inside the prompt) is not caught.
"""

from __future__ import annotations

from .protocol import InvalidRequestError

BadWords = tuple[tuple[int, ...], ...]


def bad_word_token_ids(tokenizer, words: list[str]) -> BadWords:
    """The token sequences that spell `words` at a word start.

    A sentencepiece tokenizer marks a word start itself, so each word has one sequence. A
    byte-level BPE writes "word" and " word" with different first tokens; both are kept when the
    space joins the first token (same length), as vLLM does, so the word is banned at the start of
    the text and after a space."""
    if not words:
        return ()
    if tokenizer is None:
        raise InvalidRequestError("bad_words needs the model's tokenizer, and this engine has none",
                                  param="bad_words")
    out: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_bos=False))
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_bos=False))
        for ids in (bare, spaced):
            if ids and ids not in out and (ids is bare or len(ids) == len(bare)):
                out.append(ids)
    return tuple(out)


def banned_next(bad: BadWords, output: list[int]) -> list[int]:
    """Token ids that would complete one of the sequences right after `output` (generated tokens)."""
    banned = []
    n = len(output)
    for ids in bad:
        k = len(ids) - 1
        if k <= n and (k == 0 or tuple(output[n - k:]) == ids[:-1]):
            banned.append(ids[-1])
    return banned


def depends_on_output(bad: BadWords) -> bool:
    """Whether the ban depends on the tokens generated so far (a word of several tokens)."""
    return any(len(ids) > 1 for ids in bad)
