"""Patterns of q (``~=``, ``!~=``) and idPattern: the same answers from Python's re and
PostgreSQL's regular expressions.

SQLite (and the in-process evaluator) run a pattern with Python's re, PostgreSQL with its own
ARE engine, and the two read many patterns differently. qlang.portable_regex takes a subset
whose meaning is the same in both and writes it out for each; these tests run both engines
side by side, on hand-picked and generated patterns over texts with newlines, word and
non-word characters and non-ASCII letters, and check that what the subset refuses is refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cityward.bank.errors import BadRequestData, pattern_refused
from cityward.bank.query import parse_q
from cityward.bank.query.qlang import (
    MAX_ASSERTIONS,
    MAX_BOUNDARIES,
    MAX_REGEX_SIZE,
    RegexNotPortable,
    portable_regex,
)
from cityward.bank.query.sqlgen import compile_pattern
from tests.conftest import PG_URL


@pytest.fixture(scope="module")
def pg() -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(PG_URL, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {PG_URL} (CITYWARD_TEST_PG) is not reachable: {exc}")
    yield conn
    conn.close()


def pg_search(conn: psycopg.Connection[Any], pattern: str, texts: Sequence[str]) -> list[bool]:
    """PostgreSQL's answers for ``texts``, as the bank asks them (sqlgen.regex_condition)."""
    return pg_match(conn, portable_regex(pattern).postgres, texts)


def pg_match(conn: psycopg.Connection[Any], written: str, texts: Sequence[str]) -> list[bool]:
    """PostgreSQL's answers for a pattern already written in its own syntax."""
    rows = conn.execute(
        'SELECT t COLLATE "C" ~ %s FROM unnest(%s::text[]) WITH ORDINALITY u(t, n) ORDER BY n',
        [written, list(texts)],
    ).fetchall()
    return [bool(r[0]) for r in rows]


def py_search(pattern: str, texts: Sequence[str]) -> list[bool]:
    """Python's answers, as SQLite's regexp() and the evaluator ask them."""
    rx = compile_pattern(pattern)
    return [rx.search(t) is not None for t in texts]


# --- hand-picked --------------------------------------------------------------------------------

# (pattern, text, expected): the meaning the API documents, on both engines
AGREED: list[tuple[str, str, bool]] = [
    (r"\bworld", "hello world", True),
    (r"\bworld", "helloworld", False),
    (r"hello\b", "hello, world", True),
    (r"\Bell", "hello", True),
    (r"\B", "", True),  # no boundary in an empty text (Python's own \B says otherwise)
    (r"\b", "", False),
    (r"caf\b", "café", True),  # \w is ASCII: é is not a word character
    (r"\w", "é", False),
    (r"\W", "é", True),
    (r"\d", "٣", False),  # ASCII digits only
    (r"\s", "\x0b", True),
    (r"\s", "\u00a0", False),
    (r"^\S+$", "abc", True),
    ("(?i)HELLO", "hello world", True),
    ("(?i)[A-Z]+$", "abc", True),
    ("(?i)k", "\u212a", False),  # KELVIN SIGN: case folding is ASCII only
    ("(?i)é", "É", False),
    ("(?i)[^a]", "A", False),
    ("(?i)[Z-a]", "z", True),
    ("HELLO", "hello", False),
    ("a.c", "a\nc", True),  # '.' matches a newline
    ("^b", "a\nb", False),  # ^ and $ anchor the whole text only
    ("a$", "a\nb", False),
    ("a$", "a\n", False),  # $ is the very end, also before a final newline
    (r"a\Z", "a\n", False),
    (r"\Aa", "ba", False),
    ("[^a]", "\n", True),
    (r"\x41B", "AB", True),  # \x takes exactly two hex digits
    (r"\u00e9", "é", True),
    (r"\U0001F600", "\U0001f600", True),
    (".", "\U0001f600", True),
    (r"[\u00e0-\u00ea]", "é", True),
    (r"[\]]", "]", True),
    ("[]a]", "]", True),
    ("[a-]", "-", True),
    (r"[\d_-]+$", "12_-", True),
    (r"\.", "x", False),
    (r"\\", "a\\b", True),
    (r"\ ", "a b", True),
    ("a{2}", "aa", True),
    ("^a{2}$", "aaa", False),
    ("a{1,3}?b", "aaab", True),
    ("^(?:ab|cd)+$", "abcdab", True),
    ("(a|b)c", "bc", True),
    ("(?=.*b)a", "ab", True),
    ("(?!b)a", "a", True),
    ("a(?!b)", "ab", False),
    ("", "", True),
    ("x|", "y", True),
    ("()", "", True),
]


@pytest.mark.postgres
@pytest.mark.parametrize(("pattern", "text", "expected"), AGREED)
def test_documented_meaning_on_both_engines(
    pg: psycopg.Connection[Any], pattern: str, text: str, expected: bool
) -> None:
    assert py_search(pattern, [text]) == [expected]
    assert pg_search(pg, pattern, [text]) == [expected]


# (pattern, what the refusal names)
REFUSED: list[tuple[str, str]] = [
    ("(?P<x>hello)", "named groups"),
    ("(?<x>hello)", "named groups"),
    ("(a)(?P=x)", "named groups"),
    ("(a)\\1", "back references"),
    ("\\0", "octal"),
    ("(?i:HELLO)", "inline flags"),
    ("a(?i)b", "inline flags"),
    ("(?a)\\w", "inline flags"),
    ("(?s).", "inline flags"),
    ("(?x)a b", "inline flags"),
    ("(?-i:a)", "inline flags"),
    ("\\N{LATIN SMALL LETTER H}", "\\N{...}"),
    ("[[:alpha:]]+", "POSIX classes"),
    ("[[.a.]]", "POSIX classes"),
    ("[[=a=]]", "POSIX classes"),
    ("[a[]", "write \\["),
    ("a{,3}", "{,n}"),
    ("a{1, 2}", "write \\{"),
    ("a{256}", "above 255"),
    ("a{3,2}", "wrong way round"),
    ("(?<=a)b", "lookbehind"),
    ("(?<!a)b", "lookbehind"),
    ("(?>a)", "atomic"),
    ("(?#c)a", "comments"),
    ("(?(1)a|b)", "conditional"),
    ("a**", "repeat of a repeat"),
    ("a*+", "possessive"),
    ("a{2}{3}", "repeat of a repeat"),
    ("*a", "nothing to repeat"),
    ("^*", "cannot be repeated"),
    ("\\b+", "cannot be repeated"),
    ("(?=a)*", "cannot be repeated"),
    ("(?:^|a)*", "cannot be repeated"),
    ("(?:\\b|\\B)?x", "cannot be repeated"),
    ("\\m", "escape \\m"),
    ("\\M", "escape \\M"),
    ("\\y", "escape \\y"),
    ("\\Y", "escape \\Y"),
    ("\\z", "escape \\z"),
    ("\\a", "escape \\a"),
    ("\\x4", "exactly 2 hex"),
    ("\\x{41}", "exactly 2 hex"),
    ("\\u41", "exactly 4 hex"),
    ("\\ud800", "not a character"),
    ("[\\b]", "\\b is not allowed inside"),
    ("[\\D]", "write [^...]"),
    ("[a-\\d]", "a character at each end"),
    ("[z-a]", "wrong way round"),
    ("[a-z-0]", "write \\-"),
    ("[--a]", "write \\-"),
    ("a]", "write \\]"),
    ("a}", "write \\}"),
    ("(a", "missing )"),
    ("a)", "unbalanced"),
    ("[a", "missing ]"),
    ("a\\", "lone \\"),
    ("a\x00", "not allowed"),
    ("(?:(?:a{100}){100})", "too large"),
    ("\\b" * (MAX_BOUNDARIES + 1), f"more than {MAX_BOUNDARIES}"),
    ("^" * (MAX_ASSERTIONS + 1), f"more than {MAX_ASSERTIONS}"),
    ("(" * 40 + ")" * 40, "nested deeper"),
]


@pytest.mark.parametrize(("pattern", "named"), REFUSED, ids=[p[:30] for p, _ in REFUSED])
def test_refused_patterns_say_what_is_not_allowed(pattern: str, named: str) -> None:
    with pytest.raises(RegexNotPortable) as info:
        portable_regex(pattern)
    assert named in str(info.value)
    assert isinstance(info.value, re.error)  # refused wherever re.compile was the check
    with pytest.raises(re.error):
        compile_pattern(pattern)  # the evaluator and subscriptions' idPattern too


def test_refusal_in_q_names_q_and_the_position() -> None:
    with pytest.raises(BadRequestData) as info:
        parse_q("name~=(?P<x>hello)")
    assert info.value.field == "q"
    assert "named groups" in info.value.detail and "position 6" in info.value.detail
    with pytest.raises(BadRequestData) as info:
        parse_q('name~="x(?i)"')  # quoted: the position counts from the pattern's first char
    assert "inline flags" in info.value.detail and "position 8" in info.value.detail


@pytest.mark.postgres
def test_largest_patterns_compile_quickly_on_postgres(pg: psycopg.Connection[Any]) -> None:
    # the subset's size and assertion limits keep PostgreSQL's compile in milliseconds: it
    # refuses larger ones as "too complex" (after seconds, for chains of assertions)
    big = [
        "(?:.{70}){70}",
        "(?:[a-z\\u00e0-\\u00ff]{69}){70}",
        "|".join(chr(0x4E00 + i) for i in range(MAX_REGEX_SIZE - 100)),
        "(?:\\b|\\B)" * (MAX_BOUNDARIES // 2)
        + "(?:^|$)" * ((MAX_ASSERTIONS - MAX_BOUNDARIES) // 2),
        "(?:\\b|\\B|)" * (MAX_BOUNDARIES // 2)
        + "(?:^|$|)" * ((MAX_ASSERTIONS - MAX_BOUNDARIES) // 2),
        "(?:(?:\\b|\\B)(?:.(?:\\b|\\B))*)" * (MAX_BOUNDARIES // 4) + "(?:^|$)" * 4,
    ]
    text = ["ab c" * 30]
    for pattern in big:
        assert pg_search(pg, pattern, text) == py_search(pattern, text), pattern[:40]
    # What the limits keep out, timed in the same run: a chain of assertions past them that
    # PostgreSQL still compiles (18 \b/\B and 2 ^/$, in about a second; a few more and it
    # refuses it as too complex, after seconds). Every admitted pattern must compile in under
    # half that (a fifth at most, measured). Each is timed at its first use on a fresh
    # connection (PostgreSQL caches compiled patterns per connection), twice: the faster one
    # is the compile without noise.
    pair = portable_regex("(?:\\b|\\B)").postgres.removeprefix("(?s)")
    anchor = portable_regex("(?:^|$)").postgres.removeprefix("(?s)")
    runaway = "(?s)" + pair * 9 + anchor
    written = {p: portable_regex(p).postgres for p in big}
    took: dict[str, float] = {}
    for _ in range(2):
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            pg_match(conn, "x", text)  # the connection's own first query
            for pattern in [*big, runaway]:
                started = time.perf_counter()
                pg_match(conn, written.get(pattern, pattern), text)
                seconds = time.perf_counter() - started
                took[pattern] = min(seconds, took.get(pattern, seconds))
    slow = took.pop(runaway)
    for pattern, seconds in took.items():
        assert seconds < slow / 2, (
            f"{pattern[:40]}: {seconds:.3f} s to compile, against {slow:.3f} s for a chain of "
            "assertions past the limits"
        )


@pytest.mark.postgres
def test_postgres_refusing_a_pattern_is_a_400(pg: psycopg.Connection[Any]) -> None:
    # the second line of defence, for a refusal the subset did not foresee
    with pytest.raises(psycopg.errors.InvalidRegularExpression) as info:
        pg.execute("SELECT 'x' ~ '(?P<x>a)'")
    refused = pattern_refused(info.value, "idPattern")
    assert refused is not None and refused.status == 400 and refused.field == "idPattern"
    assert pattern_refused(ValueError("x"), "q") is None


# --- generated ----------------------------------------------------------------------------------

TEXT = st.text(
    alphabet=st.sampled_from([*"abcABCxyz019_-. \n\t\r\x0b,;é\u212aKßİı", "\U0001f600"]),
    max_size=8,
)
CHAR = st.sampled_from([*"abcxAZ09_- .,é", "\\.", "\\-", "\\n", "\\t", "\\x41", "\\u00e9"])
CLASS_ITEM = st.one_of(
    CHAR.filter(lambda c: c not in ("-", ".")),
    st.sampled_from(["a-c", "A-Z", "0-9", "\\d", "\\w", "\\s", "\\u00e0-\\u00ea", "\\]", "\\["]),
)
ASSERTION = st.sampled_from(["^", "$", "\\A", "\\Z", "\\b", "\\B"])
QUANT = st.sampled_from(["*", "+", "?", "{2}", "{0,2}", "{1,}", "*?", "+?", "??", "{1,3}?"])


@st.composite
def bracket(draw: st.DrawFn) -> str:
    neg = draw(st.sampled_from(["", "^"]))
    return "[" + neg + "".join(draw(st.lists(CLASS_ITEM, min_size=1, max_size=3))) + "]"


def consuming(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Pieces that match at least one character, so that they may be repeated."""
    return st.one_of(
        CHAR,
        bracket(),
        st.sampled_from([".", "\\d", "\\D", "\\w", "\\W", "\\s", "\\S"]),
        st.tuples(st.lists(inner, min_size=1, max_size=3), CHAR).map(
            lambda t: "(?:" + "|".join(b + t[1] for b in t[0]) + ")"
        ),
    )


PATTERN: st.SearchStrategy[str] = st.recursive(
    st.one_of(consuming(st.just("a")), ASSERTION),
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=4).map("".join),
        st.tuples(consuming(inner), QUANT).map("".join),
        st.lists(inner, min_size=2, max_size=3).map(lambda xs: "(" + "|".join(xs) + ")"),
        st.tuples(st.sampled_from(["(?=", "(?!"]), inner).map(lambda t: t[0] + t[1] + ")"),
    ),
    max_leaves=10,
)
SETTINGS = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.postgres
@SETTINGS
@given(
    pattern=st.tuples(st.sampled_from(["", "", "(?i)"]), PATTERN).map("".join),
    texts=st.lists(TEXT, min_size=1, max_size=30),
)
def test_generated_patterns_agree(
    pg: psycopg.Connection[Any], pattern: str, texts: list[str]
) -> None:
    try:
        portable_regex(pattern)
    except RegexNotPortable:
        assume(False)  # over a limit (assertions, size) by chance: the fuzz below covers those
    assert py_search(pattern, texts) == pg_search(pg, pattern, texts), pattern
    # ... and the pattern means what Python reads in it, for Python's flags ASCII and DOTALL
    # (the documented difference: $ before a newline that ends the text; and Python's own \B
    # never matches an empty text before 3.14)
    own = re.compile(pattern, re.ASCII | re.DOTALL)
    for text, got in zip(texts, py_search(pattern, texts), strict=True):
        if text and not text.endswith("\n"):
            assert (own.search(text) is not None) == got, (pattern, text)


METACHARS = [
    *"ab\\()[]{}^$.*+?|-:=!<>Pisxwdb0129,_ \nué",
    "\\d",
    "\\w",
    "\\b",
    "(?:",
    "(?=",
    "(?!",
    "(?i)",
    "[^",
    "{2}",
    "{1,3}",
    "\\x41",
    "\\u00e9",
    "[:alpha:]",
]


@pytest.mark.postgres
@SETTINGS
@given(
    pattern=st.lists(st.sampled_from(METACHARS), max_size=10).map("".join),
    texts=st.lists(TEXT, min_size=1, max_size=20),
)
def test_any_text_is_refused_or_agrees(
    pg: psycopg.Connection[Any], pattern: str, texts: list[str]
) -> None:
    try:
        portable_regex(pattern)
    except RegexNotPortable:
        return  # refused cleanly: a 400 for the client, never a 500 on either store
    # accepted: PostgreSQL takes it (no error) and both engines agree
    assert py_search(pattern, texts) == pg_search(pg, pattern, texts), pattern
