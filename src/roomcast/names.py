"""Display names that cannot impersonate anyone (sans I/O).

Two rules, in every auth mode:

- :func:`normalize_name` is what a name *is*: NFKC (fullwidth letters become ASCII, a
  no-break space a space), whitespace collapsed and trimmed, and nothing invisible. A name
  that still holds a control character, a line break, a bidirectional control, or a
  character that draws nothing (zero-width joiners and non-joiners outside emoji, LRM/RLM/
  ALM, CGJ, Hangul fillers, the Braille blank, variation selectors outside emoji, tag
  characters) is refused: it could only be there to look like something it is not.
- :func:`skeleton` is what a name *looks like*, in the spirit of Unicode TR39: case
  folded, every character replaced by one representative of the characters it can be
  mistaken for (Cyrillic and Latin ``a``; ``l``, ``I`` and ``1``), from the
  confusables data of the ``confusable-homoglyphs`` package (Unicode's confusables.txt).
  Two members of a room whose skeletons are equal are the same name as far as a reader
  can tell, so the second is refused unless it is the same user.
"""

from __future__ import annotations

import json
import unicodedata
from functools import cache
from importlib import resources
from typing import Final

__all__ = ["MAX_NAME_LENGTH", "BadName", "confusable", "normalize_name", "skeleton"]

MAX_NAME_LENGTH: Final = 32

ZWJ: Final = "\u200d"
VS16: Final = "\ufe0f"
#: letters and marks that draw nothing, though Unicode does not class them as format
#: characters: Hangul fillers, the Braille blank, the combining grapheme joiner, the Khmer
#: inherent vowels (with the format characters and variation selectors, this covers
#: Unicode's Default_Ignorable_Code_Point)
_BLANK_LETTERS: Final = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u17b4\u17b5")
#: ASCII characters that pass for each other beyond Unicode's confusables data (``0`` and
#: ``o`` side by side in a lower-case name)
_EXTRA_PEERS: Final = (("0", "o"),)
#: letters that pass for two (TR39 maps ``m`` to ``rn``; ``w`` and ``d`` are the other
#: classics): in a skeleton each is written as the pair, so ``rnallory`` is ``mallory``
_PAIRS: Final = {"m": "rn", "w": "vv", "d": "cl"}
#: bidirectional controls (some are format characters, all are refused)
_BIDI: Final = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAKS: Final = frozenset("\n\r\x0b\x0c\x85\u2028\u2029")
_REFUSED_CATEGORIES: Final = frozenset({"Cc", "Cs", "Co", "Cn", "Zl", "Zp"})


class BadName(ValueError):
    """A display name is refused; the message says why, for the person who chose it."""


def normalize_name(raw: str) -> str:
    """The name ``raw`` stands for: NFKC, whitespace collapsed and trimmed.

    :raises BadName: if it is empty, longer than :data:`MAX_NAME_LENGTH` characters, or
        holds a line break, a control, bidirectional or invisible character
    """
    if any(char in _LINE_BREAKS for char in raw):
        raise BadName("name holds a line break")
    name = " ".join(unicodedata.normalize("NFKC", raw).split())
    if not name:
        raise BadName("name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise BadName(f"name must be at most {MAX_NAME_LENGTH} characters")
    for index, char in enumerate(name):
        if char in _BIDI:
            raise BadName(f"name holds a bidirectional control (U+{ord(char):04X})")
        if _invisible(name, index):
            raise BadName(f"name holds an invisible character (U+{ord(char):04X})")
        if unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise BadName(f"name holds a control character (U+{ord(char):04X})")
    return name


def skeleton(name: str) -> tuple[str, str]:
    """What ``name`` looks like, twice: case folded before confusables are mapped
    (``ALICE`` as ``alice``), and after (``aIice``, with a capital I, as ``alice``). Two
    names are indistinguishable if either skeleton is equal (:func:`confusable`)."""
    text = "".join(char for char in unicodedata.normalize("NFKC", name) if char not in (ZWJ, VS16))
    return _paired(_mapped(text.casefold())), _paired(_mapped(text).casefold())


def confusable(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether names with skeletons ``a`` and ``b`` look the same to a reader."""
    return a[0] == b[0] or a[1] == b[1]


def _mapped(text: str) -> str:
    prototypes = _prototypes()
    return "".join(prototypes.get(char, char) for char in text)


def _paired(skeleton: str) -> str:
    """Each of :data:`_PAIRS` written as the pair it passes for, mapped like the rest."""
    return _mapped("".join(_PAIRS.get(char, char) for char in skeleton))


def _invisible(name: str, index: int) -> bool:
    """Whether ``name[index]`` draws nothing. A zero-width joiner between two symbols and
    a variation selector after one are part of an emoji (a family, a coloured heart), so
    they pass; anywhere else they only hide something."""
    char = name[index]
    if char == ZWJ:
        return not (
            0 < index < len(name) - 1 and _symbol(name[index - 1]) and _symbol(name[index + 1])
        )
    if char == VS16:
        return not (index > 0 and _symbol(name[index - 1]))
    return char in _BLANK_LETTERS or unicodedata.category(char) == "Cf" or _selector(char)


def _symbol(char: str) -> bool:
    return unicodedata.category(char) == "So" or char == VS16


def _selector(char: str) -> bool:
    code = ord(char)
    return 0xFE00 <= code <= 0xFE0F or 0xE0100 <= code <= 0xE01EF or 0x180B <= code <= 0x180F


@cache
def _prototypes() -> dict[str, str]:
    """Each confusable character -> its prototype: the ASCII character it passes for.

    ASCII characters that pass for each other (``l``, ``I``, ``1``, ``|``; ``O``, ``0``)
    share one prototype, the lowest; any other character maps to the prototype of the
    ASCII characters it is listed as confusable with. Only the ASCII classes are merged:
    following chains through other scripts joins characters nobody would confuse.
    """
    data: dict[str, list[dict[str, str]]] = json.loads(
        resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    )
    parent: dict[str, str] = {}

    def root(char: str) -> str:
        while parent.get(char, char) != char:
            char = parent[char]
        return char

    def ascii_peers(char: str) -> list[str]:
        return [e["c"] for e in data.get(char, ()) if len(e["c"]) == 1 and e["c"].isascii()]

    pairs = [(c, peer) for c in data if len(c) == 1 and c.isascii() for peer in ascii_peers(c)]
    for char, peer in [*pairs, *_EXTRA_PEERS]:
        low, high = sorted((root(char), root(peer)))
        if low != high:
            parent[high] = low
    prototypes = {char: root(char) for char in parent}
    for char in data:
        if len(char) == 1 and not char.isascii() and (peers := ascii_peers(char)):
            prototypes[char] = root(min(peers))
    return prototypes
