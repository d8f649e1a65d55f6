"""A simulated text generator: deterministic words seeded by the prompt, real token counts.

The same prompt always gives the same text, so tests can assert on results.
Every word of the vocabulary is one WordPiece token of the real tokenizer, so a
completion of N words is N tokens and ``max_tokens`` is respected exactly; the
``usage`` figures still come from :func:`inferstream.tokens.count_tokens`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from inferstream.tokens import count_tokens

FinishReason = Literal["stop", "length"]
DEFAULT_MAX_TOKENS = 16
# The length a prompt "wants" lies in this range; a smaller max_tokens cuts it off.
_MIN_NATURAL, _MAX_NATURAL = 8, 64

_WORDS = (
    "the model said that a stream of events moves through the log and every worker "
    "reads its own part while the queue holds slow work for later so each answer "
    "comes back in time with one result per request and the user can see what "
    "happened next because data flows from here to there over many small steps "
    "under load some calls fail then retry until they succeed or give up this "
    "text is only a simulation but it reads like words people write every day"
).split()


@dataclass(frozen=True)
class Completion:
    """One generated choice with its token accounting."""

    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    """The distinct words of ``_WORDS`` that are exactly one token."""
    unique = sorted(set(_WORDS))
    return tuple(w for w in unique if count_tokens([w]) == 1)


def _seed(prompt: str) -> bytes:
    return hashlib.sha256(prompt.encode("utf-8")).digest()


def generate_text(prompt: str, max_tokens: int) -> tuple[str, FinishReason]:
    """Deterministic text for ``prompt``: at most ``max_tokens`` tokens."""
    seed = _seed(prompt)
    natural = _MIN_NATURAL + int.from_bytes(seed[:4], "big") % (_MAX_NATURAL - _MIN_NATURAL + 1)
    length = min(natural, max_tokens)
    words = vocabulary()
    out: list[str] = []
    block = seed
    while len(out) < length:
        # Extend the stream by hashing the previous block: cheap and reproducible.
        block = hashlib.sha256(block).digest()
        for i in range(0, len(block) - 1, 2):
            if len(out) == length:
                break
            out.append(words[int.from_bytes(block[i : i + 2], "big") % len(words)])
    finish: FinishReason = "stop" if natural <= max_tokens else "length"
    return " ".join(out), finish


def complete(prompt: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> Completion:
    """Generate for one prompt and count prompt and completion tokens."""
    text, finish = generate_text(prompt, max_tokens)
    return Completion(
        text=text,
        finish_reason=finish,
        prompt_tokens=count_tokens([prompt]),
        completion_tokens=count_tokens([text]) if text else 0,
    )


def render_chat(messages: list[tuple[str, str]]) -> str:
    """The prompt a chat is generated from: one ``role: content`` line per message."""
    return "\n".join(f"{role}: {content}" for role, content in messages)


def complete_chat(
    messages: list[tuple[str, str]], max_tokens: int = DEFAULT_MAX_TOKENS
) -> Completion:
    """Generate a chat reply; prompt tokens count the message contents, not the roles."""
    text, finish = generate_text(render_chat(messages), max_tokens)
    return Completion(
        text=text,
        finish_reason=finish,
        prompt_tokens=count_tokens([content for _, content in messages]),
        completion_tokens=count_tokens([text]) if text else 0,
    )
