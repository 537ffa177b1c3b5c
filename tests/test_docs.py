"""The documentation stays honest: README.md and docs/*.md link only to what the repository
holds, and docs/protocol.md names every setting, close code and error code the code has,
and every field of every event the server sends.

Cheap checks on text, no server: they fail when a setting, a close code, an error code or
an event field is added without its documentation, or when a link or an anchor goes stale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from roomcast import protocol
from roomcast.protocol import CloseCode, ErrorCode
from roomcast.settings import describe

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PROTOCOL = ROOT / "docs" / "protocol.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]

#: ``[text](target)``; the text may hold brackets of its own only inside code
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]+`")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def links(document: Path) -> list[str]:
    """The targets of the document's Markdown links, outside code blocks and code spans
    (link text in backticks is kept as text: the link around it still counts)."""
    text = _FENCE.sub("", document.read_text())
    return _LINK.findall(_CODE_SPAN.sub("code", text))


def anchors(document: Path) -> set[str]:
    """The anchors GitHub gives the document's headings: lower case, punctuation dropped,
    spaces as hyphens, ``-1``, ``-2`` ... after repeats."""
    seen: dict[str, int] = {}
    found = set()
    for heading in _HEADING.findall(_FENCE.sub("", document.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        repeats = seen.get(slug, 0)
        seen[slug] = repeats + 1
        found.add(slug if not repeats else f"{slug}-{repeats}")
    return found


def section(document: Path, heading: str) -> str:
    """The text under ``## heading`` up to the next heading of that level."""
    text = document.read_text()
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def table_rows(text: str) -> list[str]:
    """The first cell of every Markdown table row in ``text``, without its backticks."""
    return [line.split("|")[1].strip().strip("`") for line in text.splitlines() if line[:1] == "|"]


def test_readme_does_not_point_outside_the_repository() -> None:
    readme = README.read_text()
    assert "../shared" not in readme
    assert re.search(r"\bSPEC\b", readme) is None, "cite docs/protocol.md, not the SPEC"


def test_readme_links_the_protocol() -> None:
    assert "docs/protocol.md" in links(README)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: path.name)
def test_relative_links_point_at_files_and_anchors_that_exist(document: Path) -> None:
    broken = [
        target
        for target in links(document)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # https:, mailto: ...
        and not resolves(document, target)
    ]
    assert not broken, f"{document.name}: {broken}"


def resolves(document: Path, target: str) -> bool:
    """Whether a relative link names a file inside the repository, and a heading of it
    when it has an anchor into a Markdown file."""
    path, _, anchor = target.partition("#")
    file = (document.parent / path).resolve() if path else document
    if not file.is_relative_to(ROOT) or not file.exists():
        return False
    return not anchor or file.suffix != ".md" or anchor in anchors(file)


def test_every_setting_is_in_the_protocol_and_the_readme_settings_tables() -> None:
    in_protocol = set(table_rows(section(PROTOCOL, "Settings")))
    in_readme = set(table_rows(section(README, "Settings")))
    for variable, _, _ in describe():
        assert variable in in_protocol, f"{variable} is missing from docs/protocol.md"
        assert variable in in_readme, f"{variable} is missing from README.md's Settings"


def test_every_close_code_is_in_the_protocol_close_code_table() -> None:
    documented = set(table_rows(section(PROTOCOL, "Close codes")))
    missing = [code for code in CloseCode if str(int(code)) not in documented]
    assert not missing


def test_every_error_code_is_in_the_protocol_error_code_table() -> None:
    documented = set(table_rows(section(PROTOCOL, "Error codes")))
    missing = [code for code in ErrorCode if code.value not in documented]
    assert not missing


#: one of each event the server sends, with every optional field present
EVENTS = [
    protocol.encode_welcome(
        room="r", epoch="e", seq=1, people=[("u", "a")], count=1, max_text=4000
    ),
    protocol.encode_message(room="r", seq=1, text="t", sender="a", ts=1, id="i", user="u"),
    protocol.encode_presence(
        room="r", joined=["a"], left=[], joins=1, leaves=0, count=1, people=[("u", "a")], user="u"
    ),
    protocol.encode_ack(id="i", seq=1),
    protocol.encode_error(ErrorCode.HISTORY_GAP, "m", id="i", epoch="e", since=0, first=1),
    protocol.encode_history(room="r", epoch="e", before=2, messages=[], more=False, id="i"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: json.loads(event)["type"])
def test_every_field_of_every_event_is_in_the_protocol(event: str) -> None:
    fields = json.loads(event)
    kind = fields.pop("type")
    text = PROTOCOL.read_text()
    start = text.index(f"\n**`{kind}`**")
    end = re.compile(r"\n(\*\*`|#)").search(text, start + 1)
    described = text[start : end.start() if end else len(text)]
    documented = {
        name.strip().strip("`") for row in table_rows(described) for name in row.split(",")
    }
    assert set(fields) <= documented, f"{kind}: {set(fields) - documented}"
