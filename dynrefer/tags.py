"""Region tags parsed from captions, and the tag vocabulary the tag head is trained on.

The official DynRefer parses tags with a POS tagger and keeps those in RAM's tag list. We do without
both, so nothing is downloaded at run time: a rule-based tokenizer, word lists and a rule-based
English singulariser. The word lists are heuristics tuned for short region captions
("a man wearing a red shirt", "white clouds in blue sky"). Choices:

* A tag is a word that describes the region itself: objects, attributes and states. Kept: nouns,
  adjectives and state participles ("standing", "parked", "sliced"; Visual Genome's attribute list has
  them too). Dropped: stopwords, words that only relate the region to something else ("wearing",
  "holding", "has", "on", "next to"), spatial words ("left", "top", "background"), quantity words
  ("two", "pair", "several") and anything with a digit.
* Only plural nouns are lemmatised ("stripes" -> "stripe", "boxes" -> "box", "leaves" -> "leaf",
  "men" -> "man"); other words stay as written ("larger", "sitting").
* Pluralia tantum keep their plural: "glasses" (in captions usually eyewear), "pants", "jeans",
  "scissors"... "people" stays "people" (a group, not "person").
* Hyphenated words are one tag, singularised on their last part ("t-shirts" -> "t-shirt"); a possessive
  "'s" is dropped; accents are stripped ("café" -> "cafe"); spelling is not normalised ("grey" != "gray").
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from dynrefer import storage

_STOPWORDS = frozenset("""
a an the this that these those there here it its it's itself they them their theirs he him his she her
hers we us our ours you your yours i me my mine who whom whose which what where when why how whoever
and or but nor so yet if then than because while although though as also too very really quite just
only even still already almost rather somewhat much more most less least such same other another else
not no yes be is are was were been being am do does did doing done have has had having can could
will would shall should may might must to for from by with without of at in on off up down out about
into onto upon over under via per like unlike well
made attached surrounded shown seen pictured visible belonging appears appear seem seems look looks
wear wears wearing hold holds holding carry carries carrying contain contains containing show shows
showing use uses using sit sits eat eats lie lies get gets getting got
""".split())

_SPATIAL = frozenset("""
left right top bottom front back side middle center centre corner edge end background foreground
distance near nearby far next close closer above below beneath underneath behind beside besides
between among around across along against inside outside within toward towards away upward upwards
downward downwards upper lower part portion section piece area rest half view image photo photograph
scene shot color colour
""".split())

_QUANTITY = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
million first second third fourth fifth last single double triple few several many some any all both
each every either neither lot lots number numbers pair couple group bunch set kind type sort bit amount
""".split())

_EXCLUDED = _STOPWORDS | _SPATIAL | _QUANTITY

#: Irregular plurals and the plurals the suffix rules below would get wrong.
SINGULAR_EXCEPTIONS: dict[str, str] = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "geese": "goose", "mice": "mouse", "oxen": "ox", "cacti": "cactus", "fungi": "fungus",
    "dice": "die", "indices": "index", "knives": "knife", "lives": "life", "wives": "wife",
    "leaves": "leaf", "loaves": "loaf", "wolves": "wolf", "shelves": "shelf", "halves": "half",
    "calves": "calf", "scarves": "scarf", "hooves": "hoof", "thieves": "thief", "selves": "self",
    "elves": "elf", "sheaves": "sheaf", "wharves": "wharf", "dwarves": "dwarf",
    "buses": "bus", "gases": "gas", "lenses": "lens", "irises": "iris", "viruses": "virus",
    "bonuses": "bonus", "cactuses": "cactus", "octopuses": "octopus", "circuses": "circus",
    "walruses": "walrus", "campuses": "campus", "canvases": "canvas", "atlases": "atlas",
    "quizzes": "quiz", "axes": "axe", "potatoes": "potato", "tomatoes": "tomato", "heroes": "hero",
    "volcanoes": "volcano", "mangoes": "mango", "dominoes": "domino", "mosquitoes": "mosquito",
    "torpedoes": "torpedo", "echoes": "echo", "tornadoes": "tornado", "buffaloes": "buffalo",
    "movies": "movie", "cookies": "cookie", "brownies": "brownie", "hoodies": "hoodie",
    "veggies": "veggie", "goalies": "goalie", "selfies": "selfie", "smoothies": "smoothie",
    "calories": "calorie", "collies": "collie", "prairies": "prairie", "zombies": "zombie",
    "rookies": "rookie", "beanies": "beanie", "birdies": "birdie", "pixies": "pixie",
    "mustaches": "mustache", "moustaches": "moustache", "headaches": "headache", "niches": "niche",
    "caches": "cache", "avalanches": "avalanche", "quiches": "quiche", "octopi": "octopus",
    "skis": "ski", "taxis": "taxi", "kiwis": "kiwi", "bikinis": "bikini", "martinis": "martini",
    "safaris": "safari", "emus": "emu", "menus": "menu", "tutus": "tutu", "gurus": "guru",
}

#: Irregular plural endings of compounds ("snowmen", "bookshelves", "grandchildren").
_IRREGULAR_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("children", "child"), ("feet", "foot"), ("teeth", "tooth"), ("geese", "goose"), ("knives", "knife"),
    ("shelves", "shelf"), ("wives", "wife"), ("men", "man"),
)
#: Singular words ending in "men", which the suffix rule must leave alone.
_MEN_SINGULARS = frozenset(
    "omen amen semen stamen abdomen specimen hymen ramen regimen acumen albumen bitumen lumen rumen yemen".split()
)

#: Words that end like plurals but are not (or keep their plural form as the tag).
INVARIANT: frozenset[str] = frozenset("""
glasses sunglasses eyeglasses goggles binoculars pants jeans shorts trousers scissors tongs pliers
tweezers pajamas pyjamas overalls leggings tights suspenders clothes people police cattle sheep deer
fish aircraft species series news gas canvas atlas christmas alias bias lens physics mathematics
electronics economics athletics gymnastics aerobics headquarters barracks means
""".split())

_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_CONTRACTION = re.compile(r"'(?:t|re|ve|ll|d|m)$")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})


def singularize(word: str) -> str:
    """The singular of an English plural noun by rules plus :data:`SINGULAR_EXCEPTIONS`; other words unchanged."""
    if word in INVARIANT:
        return word
    if word in SINGULAR_EXCEPTIONS:
        return SINGULAR_EXCEPTIONS[word]
    for plural, singular in _IRREGULAR_SUFFIXES:
        if word.endswith(plural) and word not in _MEN_SINGULARS:
            return word[: -len(plural)] + singular
    if len(word) < 4 or not word.endswith("s") or word.endswith(("ss", "us", "is", "'s")):
        return word
    if word.endswith("ies"):
        return word[:-1] if len(word) == 4 else word[:-3] + "y"
    if word.endswith(("sses", "xes", "zzes", "tzes", "ches", "shes")):
        return word[:-2]
    return word[:-1]


def _tokens(caption: str) -> Iterator[str]:
    text = caption.translate(_QUOTES)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    for token in _TOKEN.findall(text):
        if token.endswith("'s"):
            token = token[:-2]
        elif _CONTRACTION.search(token):
            continue
        yield token.replace("'", "")


def parse_tags(caption: str) -> list[str]:
    """Tags of one caption, in order of first appearance, without repeats."""
    if not caption:
        return []
    tags: dict[str, None] = {}
    for token in _tokens(caption):
        if token in _EXCLUDED or any(c.isdigit() for c in token) or len(token) < 2:
            continue
        head, _, last = token.rpartition("-")
        tag = f"{head}-{singularize(last)}" if head else singularize(token)
        if tag not in _EXCLUDED:
            tags.setdefault(tag, None)
    return list(tags)


def _informative(token: str) -> bool:
    return token not in _EXCLUDED and len(token) >= 2 and not any(c.isdigit() for c in token)


def parse_phrases(caption: str) -> list[str]:
    """The caption's noun/adjective phrases as the official control words take them, in order, without repeats.

    The official code POS-tags the caption and extends every noun or adjective over the nouns that follow it
    ("striped circle", "tennis court"). Without a tagger, a run of informative words (see :func:`parse_tags`) is
    read as adjectives ending in a noun: each word of the run is a phrase alone, and the word just before the
    run's last word also forms a phrase with it. "a small red circle" gives "small", "red circle", "circle".
    Words are kept as written (not singularised), as the official phrases are.
    """
    if not caption:
        return []
    runs: list[list[str]] = [[]]
    for token in _tokens(caption):
        if _informative(token):
            runs[-1].append(token)
        elif runs[-1]:
            runs.append([])
    phrases: dict[str, None] = {}
    for run in runs:
        for i, word in enumerate(run):
            phrases.setdefault(f"{word} {run[-1]}" if i == len(run) - 2 else word, None)
    return list(phrases)


def count_tags(captions: Iterable[str | None]) -> Counter[str]:
    """How many captions each tag appears in; Counters from shards add up with ``+``."""
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(parse_tags(caption or ""))
    return counts


class TagVocabulary:
    """An ordered tag list (most frequent first) with lookups and multi-hot encoding.

    Ties in frequency are broken alphabetically, so the order does not depend on how captions were sharded.
    """

    FORMAT = "dynrefer.tags/1"

    def __init__(self, tags: Sequence[str], counts: Sequence[int] | None = None) -> None:
        self._tags = list(tags)
        self._counts = list(counts) if counts is not None else [0] * len(self._tags)
        if len(self._counts) != len(self._tags):
            raise ValueError(f"{len(self._tags)} tags but {len(self._counts)} counts")
        self._index = {t: i for i, t in enumerate(self._tags)}
        if len(self._index) != len(self._tags):
            dupes = sorted(t for t, n in Counter(self._tags).items() if n > 1)
            raise ValueError(f"duplicate tags in vocabulary: {dupes[:10]}")

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], min_count: int = 1,
                    max_size: int | None = None) -> "TagVocabulary":
        """Keep tags seen at least ``min_count`` times, the ``max_size`` most frequent."""
        ranked = sorted(((t, n) for t, n in counts.items() if n >= min_count), key=lambda tn: (-tn[1], tn[0]))
        if max_size is not None:
            ranked = ranked[:max_size]
        return cls([t for t, _ in ranked], [n for _, n in ranked])

    @classmethod
    def from_tag_lists(cls, tag_lists: Iterable[Sequence[str] | None], min_count: int = 1,
                       max_size: int | None = None) -> "TagVocabulary":
        """Like :meth:`build` from tags already parsed (one list per caption, e.g. a prepared ``tags`` column)."""
        counts: Counter[str] = Counter()
        for tags in tag_lists:
            counts.update(set(tags or ()))
        return cls.from_counts(counts, min_count, max_size)

    @classmethod
    def build(cls, captions: Iterable[str | None], min_count: int = 1,
              max_size: int | None = None) -> "TagVocabulary":
        """Parse every caption and keep the frequent tags; a tag counts once per caption."""
        return cls.from_counts(count_tags(captions), min_count, max_size)

    @property
    def tags(self) -> list[str]:
        return list(self._tags)

    @property
    def counts(self) -> list[int]:
        return list(self._counts)

    def __len__(self) -> int:
        return len(self._tags)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tags)

    def __contains__(self, tag: object) -> bool:
        return tag in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TagVocabulary) and self._tags == other._tags and self._counts == other._counts

    def __repr__(self) -> str:
        return f"TagVocabulary({len(self)} tags: {self._tags[:5]}{'...' if len(self) > 5 else ''})"

    def index(self, tags: Iterable[str]) -> list[int]:
        """Indices of the tags in the vocabulary; tags outside it are skipped (as the tag head does)."""
        return [self._index[t] for t in tags if t in self._index]

    def multi_hot(self, tags: Iterable[str]) -> np.ndarray:
        """A float32 vector of length ``len(self)`` with 1 at each known tag."""
        out = np.zeros(len(self), dtype=np.float32)
        out[self.index(tags)] = 1.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.FORMAT, "tags": self._tags, "counts": self._counts}

    def save(self, uri: str, storage_options: storage.StorageOptions | None = None) -> None:
        storage.write_json(uri, self.to_dict(), storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: storage.StorageOptions | None = None) -> "TagVocabulary":
        """Read a vocabulary written by :meth:`save`; a malformed file raises a ValueError naming it."""
        data = storage.read_json(uri, storage_options)
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"{uri}: not a tag vocabulary (expected an object with format {cls.FORMAT!r})")
        tags, counts = data.get("tags"), data.get("counts")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"{uri}: field 'tags' must be a list of strings")
        if not isinstance(counts, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in counts):
            raise ValueError(f"{uri}: field 'counts' must be a list of integers")
        try:
            return cls(tags, counts)
        except ValueError as e:
            raise ValueError(f"{uri}: {e}") from None
