import json
import uuid

import numpy as np
import pytest

from dynrefer import storage
from dynrefer.tags import SINGULAR_EXCEPTIONS, TagVocabulary, count_tags, parse_tags, singularize


@pytest.mark.parametrize("caption, tags", [
    ("A man wearing a red shirt.", ["man", "red", "shirt"]),
    ("white clouds in blue sky", ["white", "cloud", "blue", "sky"]),
    ("the clock is green in colour", ["clock", "green"]),
    ("Two zebras standing next to each other", ["zebra", "standing"]),
    ("zebra with black and white stripes", ["zebra", "black", "white", "stripe"]),
    ("boxes on the shelves to the left of the leaves", ["box", "shelf", "leaf"]),
    ("woman\u2019s black-and-white T-shirts on the left", ["woman", "black-and-white", "t-shirt"]),
    ("the 3 dogs' tails near 2nd car", ["dog", "tail", "car"]),
    ("Caf\u00e9 tables with striped umbrellas", ["cafe", "table", "striped", "umbrella"]),
    ("a pair of glasses and blue jeans", ["glasses", "blue", "jeans"]),
    ("people waiting at the bus stop", ["people", "waiting", "bus", "stop"]),
    ("a parked car, a car and CARS", ["parked", "car"]),
    ("it's on top of the table behind them", ["table"]),
    ("", []),
    ("of the a", []),
])
def test_parse_tags(caption, tags):
    assert parse_tags(caption) == tags


@pytest.mark.parametrize("plural, singular", [
    ("stripes", "stripe"), ("boxes", "box"), ("leaves", "leaf"), ("knives", "knife"), ("gloves", "glove"),
    ("benches", "bench"), ("dishes", "dish"), ("dresses", "dress"), ("buses", "bus"), ("horses", "horse"),
    ("berries", "berry"), ("pies", "pie"), ("cookies", "cookie"), ("potatoes", "potato"), ("shoes", "shoe"),
    ("men", "man"), ("women", "woman"), ("snowmen", "snowman"), ("children", "child"), ("teeth", "tooth"),
    ("bookshelves", "bookshelf"), ("skis", "ski"), ("keys", "key"), ("bananas", "banana"), ("sizes", "size"),
    ("quizzes", "quiz"), ("mustaches", "mustache"),
    # not plural, or a plural kept as the tag
    ("glasses", "glasses"), ("pants", "pants"), ("scissors", "scissors"), ("people", "people"),
    ("sheep", "sheep"), ("grass", "grass"), ("bus", "bus"), ("tennis", "tennis"), ("cactus", "cactus"),
    ("lens", "lens"), ("series", "series"), ("gas", "gas"), ("omen", "omen"), ("famous", "famous"),
    ("red", "red"), ("standing", "standing"),
])
def test_singularize(plural, singular):
    assert singularize(plural) == singular


def test_exceptions_table_is_consistent():
    for plural, singular in SINGULAR_EXCEPTIONS.items():
        assert singularize(plural) == singular
        assert singularize(singular) == singular, singular


CAPTIONS = [
    "a red car", "the red car", "red cars parked", "a blue car", "a dog", None, "two dogs and a cat",
]


def test_count_tags_counts_once_per_caption():
    counts = count_tags(CAPTIONS + ["car car car"])
    assert counts == {"red": 3, "car": 5, "parked": 1, "blue": 1, "dog": 2, "cat": 1}


def test_build_orders_by_frequency_then_name():
    vocab = TagVocabulary.build(CAPTIONS)
    assert vocab.tags == ["car", "red", "dog", "blue", "cat", "parked"]
    assert vocab.counts == [4, 3, 2, 1, 1, 1]
    assert list(vocab) == vocab.tags and len(vocab) == 6 and "dog" in vocab and "cow" not in vocab
    assert TagVocabulary.build(CAPTIONS, min_count=2).tags == ["car", "red", "dog"]
    assert TagVocabulary.build(CAPTIONS, max_size=4).tags == ["car", "red", "dog", "blue"]
    assert TagVocabulary.build(reversed(CAPTIONS)) == vocab


def test_from_tag_lists_matches_build():
    assert TagVocabulary.from_tag_lists([parse_tags(c or "") for c in CAPTIONS]) == TagVocabulary.build(CAPTIONS)
    assert TagVocabulary.from_tag_lists([["a", "a"], None, ["a", "b"]]).counts == [2, 1]


def test_index_and_multi_hot():
    vocab = TagVocabulary(["car", "red", "dog"])
    assert vocab.index(["dog", "unknown", "car"]) == [2, 0]
    hot = vocab.multi_hot(["dog", "unknown", "car", "dog"])
    assert hot.dtype == np.float32
    np.testing.assert_array_equal(hot, [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(vocab.multi_hot([]), [0.0, 0.0, 0.0])
    assert TagVocabulary([]).multi_hot(["car"]).shape == (0,)


def test_duplicates_rejected():
    with pytest.raises(ValueError, match="duplicate tags"):
        TagVocabulary(["car", "dog", "car"])
    with pytest.raises(ValueError, match="3 tags but 2 counts"):
        TagVocabulary(["a", "b", "c"], [1, 2])


def test_save_load_round_trip(tmp_path):
    vocab = TagVocabulary.build(CAPTIONS)
    uri = str(tmp_path / "out" / "tags.json")
    vocab.save(uri)
    loaded = TagVocabulary.load(uri)
    assert loaded == vocab and loaded.tags == vocab.tags and loaded.counts == vocab.counts
    assert json.loads(open(uri).read())["format"] == "dynrefer.tags/1"


@pytest.mark.parametrize("content, message", [
    ('{"tags": ["a"]', "invalid JSON"),
    ('["a", "b"]', "not a tag vocabulary"),
    ('{"format": "dynrefer.tags/1", "tags": ["a", 1], "counts": [1, 1]}', "field 'tags' must be a list of strings"),
    ('{"format": "dynrefer.tags/1", "tags": ["a"], "counts": [1.5]}', "field 'counts' must be a list of integers"),
    ('{"format": "dynrefer.tags/1", "tags": ["a", "a"], "counts": [1, 1]}', "duplicate tags"),
])
def test_load_malformed(tmp_path, content, message):
    path = tmp_path / "tags.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"tags.json: .*{message}"):
        TagVocabulary.load(str(path))


def test_save_load_s3(request):
    try:
        server = request.getfixturevalue("s3_server")
    except pytest.FixtureLookupError:
        pytest.skip("the s3_server fixture (tests/conftest.py) is not available")
    options = server["storage_options"]
    bucket = f"tags-{uuid.uuid4().hex[:12]}"
    fs, _ = storage.filesystem(f"s3://{bucket}", options)
    fs.call_s3("create_bucket", Bucket=bucket)
    vocab = TagVocabulary.build(CAPTIONS)
    vocab.save(f"s3://{bucket}/vocab/tags.json", options)
    assert TagVocabulary.load(f"s3://{bucket}/vocab/tags.json", options) == vocab
