"""Normalisations: the WikiText detokenizer on hand-written cases, and name lookup."""

import pytest

from lmeval.errors import ConfigError
from lmeval.normalize import NORMALIZATIONS, normalize, wikitext_detokenize

# (case, WikiText input, expected output written by hand from the replacement rules)
DETOKENIZE_CASES = [
    ("hyphen", "guest @-@ starring", "guest-starring"),
    ("hyphen chain", "1 @-@ 2 @-@ 3", "1-2-3"),
    ("thousands", "1 @,@ 000 people", "1,000 people"),
    ("decimal", "3 @.@ 5 m", "3.5 m"),
    ("comma", "film , television", "film, television"),
    ("full stop", "actor . He", "actor. He"),
    ("colon", "Giles : Tu", "Giles: Tu"),
    ("semicolon", "Firm ; he", "Firm; he"),
    ("exclamation", "wow ! yes", "wow! yes"),
    ("question", "why ? because", "why? because"),
    ("adjacent stops", "a . . b", "a. . b"),
    ("parentheses", "Du Fu ( Wade )", "Du Fu (Wade)"),
    ("two parentheses", "( a ) and ( b )", "(a) and (b)"),
    ("square brackets", "note [ 1 ] here", "note [1] here"),
    ("braces", "set { x } here", "set {x} here"),
    ("double quotes", 'as " Craig " in', 'as "Craig" in'),
    ("quotes across lines", '" a\nb " c', '"a\nb" c'),
    ("unmatched quote", 'a " b', 'a " b'),
    ("single quotes", "the ' quoted ' word", "the 'quoted' word"),
    ("possessive", "Teddy 's Story", "Teddy's Story"),
    ("two possessives", "Mark 's car and Tom 's bike", "Mark's car and Tom's bike"),
    ("plural possessive", "players ' union", "players' union"),
    ("negation unchanged", "do n't go", "do n't go"),
    ("section heading", "= = Career = =", "== Career =="),
    ("subsection heading", "= = = Early = = =", "=== Early ==="),
    ("level four heading", "= = = = Deep = = = =", "==== Deep ===="),
    ("article heading", " = Robert Boulter = \n", " = Robert Boulter =\n"),
    ("degree", "20 ° C", "20°C"),
    ("degree before comma", "5 ° , then", "5 °, then"),
    ("line end space", "end \nnext", "end\nnext"),
    ("line start space", "end\n next", "end\nnext"),
    ("number token", "has N items", "has 1 items"),
    ("slash quirk", "/' 5/", "/'[0-9]/"),
    ("empty", "", ""),
    ("plain text", "no tokens here", "no tokens here"),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [(text, expected) for _, text, expected in DETOKENIZE_CASES],
    ids=[case for case, _, _ in DETOKENIZE_CASES],
)
def test_wikitext_detokenize(text, expected):
    assert wikitext_detokenize(text) == expected


def test_wikitext_detokenize_paragraph():
    raw = (
        " = Robert Boulter = \n"
        ' In 2004 Boulter landed a role as " Craig " in the episode " Teddy \'s Story '
        '" of the series , which ran 1 @,@ 000 days . \n'
    )
    expected = (
        " = Robert Boulter =\n"
        'In 2004 Boulter landed a role as "Craig" in the episode "Teddy\'s Story" '
        "of the series, which ran 1,000 days.\n"
    )
    assert wikitext_detokenize(raw) == expected


def test_normalize_none_keeps_text():
    text = " a @-@ b \n"
    assert normalize(text, ["none"]) == text


def test_normalize_empty_list_keeps_text():
    text = " a @-@ b \n"
    assert normalize(text, []) == text


def test_normalize_applies_detokenizer():
    assert normalize("a @-@ b", ["wikitext-detokenize"]) == "a-b"


def test_normalize_applies_names_in_order():
    assert normalize("a @-@ b", ["none", "wikitext-detokenize", "none"]) == "a-b"


def test_normalize_unknown_name_lists_valid():
    with pytest.raises(ConfigError) as error:
        normalize("text", ["lowercase"])
    message = str(error.value)
    assert "'lowercase'" in message
    for name in NORMALIZATIONS:
        assert name in message


def test_normalize_rejects_bare_string():
    with pytest.raises(TypeError, match="sequence of names"):
        normalize("text", "none")


def test_normalizations_constant():
    assert NORMALIZATIONS == ("none", "wikitext-detokenize")
