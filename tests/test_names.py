"""Display names that cannot impersonate (``roomcast.names``): each look-alike spelling of a
name is refused or treated as the same name."""

from __future__ import annotations

import pytest

from roomcast.names import BadName, confusable, normalize_name, skeleton

#: the issue's twelve look-alikes of "alice" (and a few more), and what becomes of each
LOOK_ALIKES = [
    ("alice ", "same"),  # trailing space
    ("alice\u00a0", "same"),  # trailing no-break space
    ("al\u200dice", "refused"),  # zero-width joiner
    ("al\u200cice", "refused"),  # zero-width non-joiner
    ("\u200ealice", "refused"),  # left-to-right mark
    ("alice\u200f", "refused"),  # right-to-left mark
    ("ali\u061cce", "refused"),  # Arabic letter mark
    ("ali\u034fce", "refused"),  # combining grapheme joiner
    ("\u0430lice", "same"),  # Cyrillic a
    ("\uff41\uff4c\uff49\uff43\uff45", "same"),  # fullwidth letters
    ("alice\u3164", "refused"),  # Hangul filler
    ("alice\u2800", "refused"),  # Braille blank
    ("ALICE", "same"),  # case
    ("aIice", "same"),  # capital I for l
    ("a1ice", "same"),  # one for l
    ("al\u00adice", "refused"),  # soft hyphen
    ("alice\ufe0f", "refused"),  # a variation selector on a letter
    ("ali\u202ece", "refused"),  # bidi override
    ("ali\u17b4ce", "refused"),  # Khmer inherent vowel (draws nothing)
    ("al\u17b5ice", "refused"),  # the other one
]


@pytest.mark.parametrize(("spelling", "outcome"), LOOK_ALIKES)
def test_look_alikes_are_refused_or_the_same_name(spelling: str, outcome: str) -> None:
    if outcome == "refused":
        with pytest.raises(BadName):
            normalize_name(spelling)
    else:
        assert confusable(skeleton(normalize_name(spelling)), skeleton("alice"))


@pytest.mark.parametrize(
    "name", ["alice", "Zoë", "José María", "李小龙", "أحمد", "👨\u200d👩\u200d👧", "❤\ufe0f", "bob"]
)
def test_names_people_use_pass(name: str) -> None:
    assert normalize_name(name) == name


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("rnallory", "mallory"),  # TR39: m is rn
        ("vvilliam", "william"),
        ("clavid", "david"),
        ("CLAVID", "david"),
        ("B0b", "Bob"),  # a zero among lower-case letters
        ("B0B", "BOB"),
        ("\U0001d5ba\U0001d5c5\U0001d5c2\U0001d5bc\U0001d5be", "alice"),  # sans-serif letters
    ],
)
def test_look_alikes_of_more_than_one_letter_are_the_same_name(a: str, b: str) -> None:
    assert confusable(skeleton(normalize_name(a)), skeleton(normalize_name(b)))


@pytest.mark.parametrize(("a", "b"), [("alice", "alicé"), ("ann", "anna"), ("bob", "rob")])
def test_different_names_stay_different(a: str, b: str) -> None:
    assert not confusable(skeleton(a), skeleton(b))


def test_whitespace_is_collapsed_and_length_checked_after_normalising() -> None:
    assert normalize_name("  two   words ") == "two words"
    assert normalize_name("\uff21" * 32) == "A" * 32
    for bad in ("", "   ", "\u00a0", "x" * 33, "a\x00b", "a\x7fb", "a\nb", "a\u2028b"):
        with pytest.raises(BadName):
            normalize_name(bad)
