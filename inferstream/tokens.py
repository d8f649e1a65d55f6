"""Token counting with a real tokenizer (all-MiniLM-L6-v2's WordPiece), loaded once.

The tokenizer file ships inside this package, so the gateway counts tokens with
no model, no torch and no network. The model server counts ``usage`` with the
same tokenizer, so estimates and actual usage are comparable.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from tokenizers import Tokenizer


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    path = resources.files("inferstream") / "data" / "minilm-tokenizer.json"
    tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def count_tokens(texts: list[str]) -> int:
    """Tokens in ``texts`` without the [CLS]/[SEP] specials."""
    if not texts:
        return 0
    if len(texts) == 1:  # the usual submission: encode_batch costs more than one text
        return len(tokenizer().encode(texts[0], add_special_tokens=False))
    encodings = tokenizer().encode_batch(texts, add_special_tokens=False)
    return sum(len(e.ids) for e in encodings)


def estimate_tokens(task: str, texts: list[str], max_tokens: int | None, default_max_tokens: int) -> int:
    """What admission reserves: input tokens, plus the completion budget for generate."""
    prompt = count_tokens(texts)
    if task == "generate":
        return prompt + (default_max_tokens if max_tokens is None else max_tokens)
    return prompt
