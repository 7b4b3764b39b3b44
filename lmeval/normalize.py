"""Text normalisations applied to a document before it is tokenized, chosen by name.

The corpus loader counts words and bytes on the text before normalisation, so a
normalisation changes the text that is scored but not the units a perplexity is
reported in.
"""

import re
from collections.abc import Callable, Sequence

from lmeval.errors import ConfigError


def _inner_spaces(open_mark: str, close_mark: str) -> tuple[re.Pattern[str], str]:
    """Build a step that removes whitespace just inside each bracket or quote pair.

    The content matched between the marks may span lines and never contains
    ``close_mark``, so ``" a " b " c "`` pairs the first two and the last two
    quotes.
    """
    body = f"[^{re.escape(close_mark)}]*?"
    pattern = re.compile(rf"{re.escape(open_mark)}\s*({body})\s*{re.escape(close_mark)}")
    return pattern, rf"{open_mark}\1{close_mark}"


# The steps of lm-evaluation-harness's ``wikitext_detokenizer``
# (lm_eval/tasks/wikitext/preprocess_wikitext.py), in its order, so that scores on
# WikiText agree with that tool. A str step is a plain ``str.replace``, which
# replaces non-overlapping matches from left to right, so ``" . . "`` loses only
# its first space pair. Order matters: the quote steps run before ``" 's"`` is
# joined, and the final ``" 's"`` step repairs what they leave.
_WIKITEXT_STEPS: tuple[tuple[str | re.Pattern[str], str], ...] = (
    # Possessive of a plural: "players ' union" -> "players' union".
    ("s '", "s'"),
    # NOTE: the reference writes this step as re.sub(r"/' [0-9]/", r"/'[0-9]/")
    # with slashes left over from another regex syntax, so it matches the literal
    # text "/' " + digit + "/" and writes "/'[0-9]/". It is kept for exact
    # agreement and does not occur in the WikiText-2 test file.
    (re.compile(r"/' [0-9]/"), "/'[0-9]/"),
    # Number separators that WikiText escapes: "1 @,@ 000" -> "1,000".
    (" @-@ ", "-"),
    (" @,@ ", ","),
    (" @.@ ", "."),
    # Punctuation that WikiText splits off the word before it.
    (" : ", ": "),
    (" ; ", "; "),
    (" . ", ". "),
    (" ! ", "! "),
    (" ? ", "? "),
    (" , ", ", "),
    # Whitespace inside brackets and quotes: "( 1 )" -> "(1)".
    _inner_spaces("(", ")"),
    _inner_spaces("[", "]"),
    _inner_spaces("{", "}"),
    _inner_spaces('"', '"'),
    _inner_spaces("'", "'"),
    # Heading markers: "= = Section = =" -> "== Section ==".
    ("= = = =", "===="),
    ("= = =", "==="),
    ("= =", "=="),
    # Degree sign: "20 ° C" -> "20°C".
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
    # Spaces at line ends and line starts.
    (" \n", "\n"),
    ("\n ", "\n"),
    # A lone N, the number placeholder of Penn Treebank-style text, becomes 1.
    (" N ", " 1 "),
    (" 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
    """Undo the tokenization spaces of WikiText, as lm-evaluation-harness does.

    The result is character for character the output of lm-evaluation-harness's
    ``wikitext_detokenizer`` on the same text, including its quirks: quote pairs
    are matched across lines, and only the space pairs that ``str.replace`` finds
    from left to right are joined.
    """
    for pattern, replacement in _WIKITEXT_STEPS:
        if isinstance(pattern, str):
            text = text.replace(pattern, replacement)
        else:
            text = pattern.sub(replacement, text)
    return text


def _identity(text: str) -> str:
    return text


_NORMALIZERS: dict[str, Callable[[str], str]] = {
    "none": _identity,
    "wikitext-detokenize": wikitext_detokenize,
}

NORMALIZATIONS: tuple[str, ...] = tuple(_NORMALIZERS)
"""Valid normalisation names, in the order the error messages list them."""


def check_names(names: Sequence[str]) -> None:
    """Raise ConfigError if any of ``names`` is not in :data:`NORMALIZATIONS`."""
    if isinstance(names, str):
        raise TypeError(f"names must be a sequence of names, got the str {names!r}")
    unknown = [name for name in names if name not in _NORMALIZERS]
    if unknown:
        raise ConfigError(
            f"unknown normalization {', '.join(map(repr, unknown))}: "
            f"use one of {', '.join(NORMALIZATIONS)}"
        )


def normalize(text: str, names: Sequence[str]) -> str:
    """Apply the normalisations ``names`` to ``text`` in the given order.

    Raises:
        ConfigError: a name is not in :data:`NORMALIZATIONS`; nothing is applied.
    """
    check_names(names)
    for name in names:
        text = _NORMALIZERS[name](text)
    return text
