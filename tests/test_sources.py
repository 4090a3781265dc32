"""Every quote the course embeds is in its source text, when the texts are on this machine.

The source texts are not part of the repository (the course cites them by public identity); where they are
present (``../shared/seeds`` beside the repository, or ``$MINIDPO_SOURCE_TEXTS``) each quote of
``minidpo.claims`` and each quotation in the notebooks' markdown that names a source is looked up in it. Where they
are absent the tests skip, saying so.
"""

import json
import re
from pathlib import Path

import pytest

from minidpo import claims

ROOT = Path(__file__).resolve().parents[1]
TEXTS = claims.source_texts_dir()
needs_texts = pytest.mark.skipif(TEXTS is None, reason="source texts not found (../shared/seeds or "
                                                       "$MINIDPO_SOURCE_TEXTS): quotes not compared")


@needs_texts
@pytest.mark.parametrize("record", claims.CLAIMS, ids=lambda c: c.id)
def test_each_record_quotes_its_source(record):
    assert claims.check_record(record) == "found"


@needs_texts
def test_a_quote_that_is_not_there_is_refused():
    with pytest.raises(ValueError, match="not found"):
        claims.quoted("glossary", "DPO always increases the log-likelihood of every completion")
    with pytest.raises(ValueError, match="unknown source"):
        claims.quoted("wikipedia", "anything")


def test_quoted_says_not_checked_when_the_texts_are_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIDPO_SOURCE_TEXTS", str(tmp_path / "nowhere"))
    monkeypatch.setattr(claims, "_TEXTS", None)
    monkeypatch.setattr(claims.Path, "is_dir", lambda self: False)
    before = len(claims.QUOTE_LOG)
    assert claims.quoted("glossary", "no text to look in") == claims.NOT_CHECKED
    assert claims.QUOTE_LOG[before:] == [("glossary", "no text to look in", claims.NOT_CHECKED)]


def test_normalise_ignores_markdown_whitespace_and_mis_decoded_punctuation():
    assert claims.normalise("in a **single   forward\npass**") == "in a single forward pass"
    assert claims.normalise("methods\u00e2\u0080\u0094such") == claims.normalise("methods\u2014such") == "methodssuch"
    assert claims.normalise("A") != claims.normalise("B")  # negative control


# quotations in the notebooks' markdown: a quoted span followed by the source's short name in parentheses,
# e.g.  “increase the log-likelihood of the preferred completion” (glossary)
_MARKDOWN_QUOTE = re.compile(r"[“\"]([^”\"]{12,200})[”\"]\s*\((chapter \(web\)|chapter|encyclopedia|tutorial|glossary)\)")


def _notebook_quotes():
    found = []
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "markdown":
                for quote, source in _MARKDOWN_QUOTE.findall("".join(cell["source"])):
                    found.append(pytest.param(source, quote, id=f"{nb.stem[:2]}:{quote[:24]}"))
    return found


@needs_texts
@pytest.mark.parametrize("source,quote", _notebook_quotes() or [pytest.param(None, None, marks=pytest.mark.skip(
    reason="no tagged quotations in the notebooks' markdown"))])
def test_notebook_markdown_quotes_are_in_their_source(source, quote):
    assert claims.quoted(source, quote) == "found"


_PLACES = sorted((ROOT / "notebooks").glob("*.ipynb")) + [ROOT / "README.md"] + sorted((ROOT / "minidpo").glob("*.py"))


@pytest.mark.parametrize("path", _PLACES, ids=lambda p: p.name)
def test_no_source_file_names_in_the_course(path):
    """A reader of the repository does not have the source texts' files: nothing may point at them."""
    pattern = re.compile(r"seeds/0\d\d|0\d\d_[0-9a-f]{16}")
    assert not (path.exists() and pattern.search(path.read_text())), f"{path.name} names a source file"
