"""Lexical guard for semantic hits: rejects near-misses that a sentence embedding scores as close.

Mean-pooled sentence embeddings are nearly bag-of-words: "convert a string to an integer" and
"convert an integer to a string" score 0.996; "boiling point of water in Celsius" and "... in
Fahrenheit" 0.91, above many true paraphrases. A cosine threshold alone cannot separate them, so a
semantic hit must also pass these checks on the two texts (query q, stored candidate c):

1. Key terms match as sets: numbers (number words count as their digits: "twelve" = "12", "a
   pair" = "2"; half/quarter/double/triple/twice are numbers too), capitalised words that are not
   common sentence words (entities, units, products, Roman numerals), quoted strings and code-like
   tokens (``os.path``, ``snake_case``, ``camelCase``). "France" vs "Germany", "12" vs "13", "WWI"
   vs "WWII", "a marathon" vs "a half marathon".
2. Negation parity: both or neither contain a negation (not, no, never, without, n't).
3. Polar words match as sets: a short lexicon of direction/extreme/opposite words
   (ascending/descending, largest/smallest, add/remove, ...), whose swap flips the answer but
   barely moves the embedding.
4. Direction: no conversion/move in one text runs the other way in the other: "X to/into/as Y"
   read as X -> Y (articles skipped), so "string to an int" and "parse a string as an integer"
   conflict with "convert an integer to a string".
5. No single-slot swap: the content words (function words dropped, light stemming) are not the same
   sequence with exactly one word replaced by an unrelated one ("legs of a spider" vs "legs of an
   insect", "symbol for gold" vs "symbol for silver"). Paraphrases restructure the sentence; a
   near-miss usually keeps it and swaps one slot. Derived forms ("painted"/"painter") count equal.

Every rule only ever turns a hit into a miss, so the guard can cost hits but never adds a wrong one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*")
# A quote opens after whitespace or at the start, closes before whitespace/punctuation/the end, so
# apostrophes ("what's gold's") are not quotes.
_QUOTED = re.compile(r"(?:^|(?<=\s))[\"'`“‘]([^\"`“”]{1,80}?)[\"'`”’](?=[\s?.!,;:]|$)")
_ARTICLES = frozenset({"a", "an", "the"})
_CODE = re.compile(r"\b\w+(?:[._/:]\w+)+\b|\b[a-z]+[A-Z]\w*\b|\b\w*_\w+\b")

# Function words and question/request words: never key terms, never content words.
STOPWORDS = frozenset(
    """a an the and or but if then so of in on at to into onto from by for with about as than
    is are was were be been being am do does did done doing have has had having can could will
    would shall should may might must i me my mine we us our you your yours he him his she her it
    its they them their this that these those there here what which who whom whose when where why
    how whats what's hows how's whos who's wheres where's whens when's
    please tell give show name explain describe list let lets let's make get find know want need
    way like just also any some each every all both most much many more very really one""".split()
)
NEGATIONS = frozenset(
    "not no never without none nor nothing neither cannot can't don't "
    "doesn't isn't aren't wasn't weren't won't shouldn't couldn't".split()
)
# Words whose swap for a counterpart flips the answer, grouped so that synonyms share a class
# ("largest" = "biggest") and opposites do not. Matched as written (lower-cased).
_POLAR_CLASSES = {
    "big+": "largest biggest greatest",
    "small-": "smallest tiniest",
    "high+": "tallest highest",
    "low-": "shortest lowest",
    "long+": "longest",
    "fast+": "fastest quickest",
    "slow-": "slowest",
    "old+": "oldest earliest first",
    "new+": "newest latest last",
    "hot+": "hottest warmest",
    "cold-": "coldest",
    "heavy+": "heaviest",
    "light-": "lightest",
    "max+": "maximum max most",
    "min-": "minimum min least fewest",
    "good+": "best",
    "bad-": "worst",
    "asc+": "ascending increasing increase",
    "desc-": "descending decreasing decrease",
    "before": "before",
    "after": "after",
    "above": "above",
    "below": "below",
    "inside": "inside",
    "outside": "outside",
    "open": "open start begin",
    "close": "close exit quit finish stop",
    "add": "add insert append",
    "remove": "remove delete",
    "create": "create",
    "destroy": "destroy",
    "enable": "enable",
    "disable": "disable",
    "install": "install",
    "uninstall": "uninstall",
    "encode": "encode encrypt",
    "decode": "decode decrypt",
    "import": "import upload",
    "export": "export download",
    "push": "push send",
    "pull": "pull receive",
    "buy": "buy",
    "sell": "sell",
    "win": "win gain profit",
    "lose": "lose loss",
    "absorb": "absorb",
    "release": "release emit",
    "north": "north",
    "south": "south",
    "east": "east",
    "west": "west",
    "positive": "positive",
    "negative": "negative",
    "upper": "upper uppercase",
    "lower": "lower lowercase",
}
POLAR_WORDS = {w: cls for cls, ws in _POLAR_CLASSES.items() for w in ws.split()}
# Number words as key terms ("one" is left out: mostly a pronoun, "which one").
_UNITS = "zero - two three four five six seven eight nine ten eleven twelve thirteen fourteen"
_UNITS += " fifteen sixteen seventeen eighteen nineteen twenty"
NUMBER_WORDS = {w: str(i) for i, w in enumerate(_UNITS.split()) if w != "-"}
NUMBER_WORDS.update(
    {
        w: str(10 * i)
        for i, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)
    }
)
NUMBER_WORDS.update(
    hundred="100",
    thousand="1000",
    million="1000000",
    billion="1000000000",
    dozen="12",
    pair="2",
    half="1/2",
    halves="1/2",
    quarter="1/4",
    quarters="1/4",
    double="x2",
    twice="x2",
    triple="x3",
    thrice="x3",
)


def _sentence_start(text: str, pos: int) -> bool:
    before = text[:pos].rstrip()
    return not before or before[-1] in ".?!:\"'“(\n"


def _stem(w: str) -> str:
    w = w.lower().removesuffix("'s").removesuffix("’s")
    for suf in ("ing", "ies", "es", "ed", "s"):
        if len(w) > len(suf) + 2 and w.endswith(suf):
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


@dataclass(frozen=True)
class TextFeatures:
    """What the guard compares, computed once per stored prompt and once per lookup."""

    key_terms: frozenset[str]
    negated: bool
    polar: frozenset[str]
    content: frozenset[str]  # stemmed content words
    content_seq: tuple[str, ...]  # the same, in text order
    moves: frozenset[tuple[str, str]]  # (source, target) stems of "X to/into/as Y"


def features(text: str) -> TextFeatures:
    words = _WORD.findall(text)
    lower = [w.lower() for w in words]
    key: set[str] = set()
    for m in _WORD.finditer(text):
        w = m.group()
        lw = w.lower().removesuffix("'s").removesuffix("’s")
        if w[0].isdigit():
            key.add(lw.replace(",", ""))
        elif lw in NUMBER_WORDS:
            key.add(NUMBER_WORDS[lw])
        elif w[0].isupper() and lw not in STOPWORDS and not _sentence_start(text, m.start()):
            # A sentence's first word is capitalised whatever it is ("Water boils..."), so it
            # only counts as a content word.
            key.add(lw)
    key.update("q:" + m.strip().lower() for m in _QUOTED.findall(text))
    key.update("c:" + m for m in _CODE.findall(text))
    content = [_stem(w) for w in lower if w not in STOPWORDS and w not in NEGATIONS]
    moves: set[tuple[str, str]] = set()
    for i, w in enumerate(lower):
        if w in ("to", "into", "as") and 0 < i < len(lower) - 1:
            src = [x for x in lower[max(0, i - 2) : i] if x not in _ARTICLES]
            dst = [x for x in lower[i + 1 : i + 3] if x not in _ARTICLES]
            if src and dst and src[-1] not in STOPWORDS and dst[0] not in STOPWORDS:
                moves.add((_stem(src[-1]), _stem(dst[0])))
    return TextFeatures(
        key_terms=frozenset(key),
        negated=any(w in NEGATIONS or w.endswith("n't") for w in lower),
        polar=frozenset(POLAR_WORDS[w] for w in lower if w in POLAR_WORDS),
        content=frozenset(content),
        content_seq=tuple(content),
        moves=frozenset(moves),
    )


def guard_reason(q: TextFeatures, c: TextFeatures) -> str | None:
    """None if a hit is allowed, else the name of the rule that refused it."""
    if q.key_terms != c.key_terms:
        return "key_terms"
    if q.negated != c.negated:
        return "negation"
    if q.polar != c.polar:
        return "polar"
    if _reversed(q, c):
        return "direction"
    a, b = q.content_seq, c.content_seq
    if len(a) == len(b) and sum(not _same_family(x, y) for x, y in zip(a, b, strict=True)) == 1:
        return "swap"
    return None


def _reversed(q: TextFeatures, c: TextFeatures) -> bool:
    """Some move a -> b of q appears as b -> a in c."""
    return any(
        _same_family(a, d) and _same_family(b, s) and not _same_family(a, b)
        for a, b in q.moves
        for s, d in c.moves
    )


def _same_family(a: str, b: str) -> bool:
    """Same word up to a derivational suffix: "paint"/"painter", "discover"/"discoverer"."""
    short, long_ = sorted((a, b), key=len)
    return a == b or (long_.startswith(short) and len(short) >= 3)
