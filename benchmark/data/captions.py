"""Caption normalisation shared by every dataset (docs/protocols.md#caption-preprocessing)."""

from __future__ import annotations

import re

_PUNCT = re.compile(r'[.!"()*#:;~]')
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Normalise a caption exactly like the reference ``pre_caption``.

    Lower-case; replace each of ``. ! " ( ) * # : ; ~`` with a space; collapse runs of two or more
    whitespace characters into one space; strip a trailing newline, then surrounding spaces; keep the
    first ``max_words`` space-separated tokens. A lone tab or newline inside the text is kept (only runs
    of >= 2 whitespace characters are collapsed), as in the reference.
    """
    text = _PUNCT.sub(" ", caption.lower())
    text = _MULTI_SPACE.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    return " ".join(text.split(" ")[:max_words])
