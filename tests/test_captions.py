"""pre_caption against hand-computed answers (docs/protocols.md#caption-preprocessing)."""

import pytest

from benchmark.data.captions import pre_caption


@pytest.mark.parametrize("raw, expected", [
    ("A Dog. Runs!", "a dog runs"),
    ('He said "hi" (twice) *loudly* #1: ok; ~fine', "he said hi twice loudly 1 ok fine"),
    ("Isn't it a well-known dog, right?", "isn't it a well-known dog, right?"),  # ' - , ? are kept
    ("3.5 kg", "3 5 kg"),
    ("a\tdog", "a\tdog"),            # a lone tab is not a run of >= 2 whitespace: kept
    ("a \t dog\n", "a dog"),          # " \t " collapses; trailing newline stripped
    ("a dog\n", "a dog"),
    ("a dog\n\n", "a dog"),           # "\n\n" collapses to a space, then stripped
    ("a\nb", "a\nb"),                 # inner single newline kept
    ("  Leading   and trailing  ", "leading and trailing"),
    ("", ""),
    ("...!!!", ""),
    ("CAFÉ Au Lait", "café au lait"),
])
def test_pre_caption_known_answers(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_truncates_to_max_words() -> None:
    assert pre_caption("One two three. Four five", max_words=3) == "one two three"
    raw = ("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 "
           "w21 w22 w23 w24 w25 w26 w27 w28 w29 w30 w31 w32")
    assert pre_caption(raw) == ("w1 w2 w3 w4 w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 w15 w16 w17 w18 w19 w20 "
                                "w21 w22 w23 w24 w25 w26 w27 w28 w29 w30")


def test_removed_punctuation_counts_as_word_separator_before_truncation() -> None:
    # "a.b" becomes two words, so the 3-word limit keeps only "a b c"
    assert pre_caption("a.b c d", max_words=3) == "a b c"
