"""The `facts` corpus: deterministic TOFU-like QA data, its cache and tokenizer. (Its forget sets are the job's
forget scenarios: tests/test_lm_job_inputs.py.)"""

from __future__ import annotations

from collections import Counter

import pytest

from unlearn.data import facts
from unlearn.data.facts import ATTRIBUTE_KINDS, CATEGORIES, SLOTS, FactsConfig, generate_facts, load_facts
from unlearn.errors import BadInput

CONFIG = FactsConfig()  # the scale the LM task uses: 200 entities x 8 attributes x 3 phrasings


@pytest.fixture(scope="module")
def corpus():
    return generate_facts(CONFIG, 0)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return load_facts(CONFIG, 0, tmp_path_factory.mktemp("cache"))


def test_same_seed_same_tables_other_seed_other_tables(corpus):
    again = generate_facts(CONFIG, 0)
    assert again.entities.equals(corpus.entities) and again.qa.equals(corpus.qa)
    other = generate_facts(CONFIG, 1)
    assert not other.entities.column("name").equals(corpus.entities.column("name"))
    assert not other.qa.column("answer").equals(corpus.qa.column("answer"))


def test_sizes_categories_and_held_out_share(corpus):
    n = CONFIG.num_entities
    assert corpus.entities.num_rows == n
    assert corpus.qa.num_rows == n * CONFIG.attributes * CONFIG.phrasings == 4800
    assert corpus.category_names == list(CATEGORIES)
    assert Counter(corpus.entities.column("category").to_pylist()) == {c: n // len(CATEGORIES) for c in CATEGORIES}
    held = corpus.entity_ids(held_out=True)
    assert len(held) == 20 and len(corpus.entity_ids(held_out=False)) == 180
    # the held-out entities are spread over the categories: every concept has non-members
    assert Counter(corpus.category_ids()[held]) == {c: 4 for c in range(len(CATEGORIES))}
    # a tiny corpus still holds one entity out
    assert len(generate_facts(FactsConfig(num_entities=5, held_out_fraction=0.01), 0).entity_ids(held_out=True)) == 1


def test_names_unique_and_every_fact_asked_in_each_phrasing(corpus):
    names = corpus.entities.column("name").to_pylist()
    assert len(set(names)) == len(names)
    rows = corpus.qa.to_pylist()
    per_fact = Counter((r["entity_id"], r["attribute"]) for r in rows)
    assert set(per_fact.values()) == {CONFIG.phrasings}
    assert len(per_fact) == CONFIG.num_entities * CONFIG.attributes
    for r in rows:
        assert names[r["entity_id"]] in r["question"]
    # the wordings of one fact differ, and its answer, paraphrase and perturbed answers do not
    facts_seen: dict[tuple, set] = {}
    for r in rows:
        facts_seen.setdefault((r["entity_id"], r["attribute"]), set()).add(
            (r["answer"], r["paraphrase"], tuple(r["perturbed"])))
    assert all(len(v) == 1 for v in facts_seen.values())
    assert len({(r["entity_id"], r["attribute"], r["question"]) for r in rows}) == len(rows)


def test_attributes_follow_the_category(corpus):
    category = corpus.entities.column("category").to_pylist()
    for r in corpus.qa.to_pylist():
        slot = next(s for s in SLOTS[:CONFIG.attributes] if ATTRIBUTE_KINDS[r["attribute"]] in s.values())
        assert slot[category[r["entity_id"]]].name == r["attribute"]
    # three category-specific slots: a category's facts include kinds no other category is asked
    kinds_of = {c: {k.name for s in SLOTS[:CONFIG.attributes] for cat, k in s.items() if cat == c} for c in CATEGORIES}
    for c in CATEGORIES:
        own = kinds_of[c] - set().union(*(kinds_of[o] for o in CATEGORIES if o != c))
        assert len(own) == 3, (c, own)


def test_paraphrase_and_perturbed_answers(corpus):
    for r in corpus.qa.to_pylist():
        kind = ATTRIBUTE_KINDS[r["attribute"]]
        assert r["answer"] in kind.values
        assert r["paraphrase"] != r["answer"] and r["answer"] in r["paraphrase"]
        assert len(r["perturbed"]) == CONFIG.perturbed == len(set(r["perturbed"]))
        assert r["paraphrase"] not in r["perturbed"]
        # wrong answers of the same attribute kind, worded like the paraphrase
        assert all(p in {facts._paraphrase(kind, v) for v in kind.values if v != r["answer"]} for p in r["perturbed"])
    city = next(r for r in corpus.qa.to_pylist() if r["attribute"] == "birth_city")
    assert city["paraphrase"] == f"the city of {city['answer']}"


def test_config_rejects_what_it_cannot_make():
    for bad in (dict(attributes=len(SLOTS) + 1), dict(phrasings=4), dict(perturbed=100), dict(held_out_fraction=0.0),
                dict(num_entities=1)):
        with pytest.raises(BadInput):
            FactsConfig(**bad)


def test_cache_round_trip_and_reuse(tmp_path, monkeypatch):
    config = FactsConfig(num_entities=20, attributes=4, phrasings=2)
    first = load_facts(config, 3, tmp_path)
    folder = tmp_path / "data" / f"facts-{facts.cache_key(config, 3)}"
    assert first.folder == folder.resolve()
    assert sorted(p.name for p in folder.iterdir()) == ["entities.parquet", "meta.json", "qa.parquet", "tokenizer.json"]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    fresh = generate_facts(config, 3)
    assert first.entities.equals(fresh.entities) and first.qa.equals(fresh.qa)
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    def no_regeneration(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(facts, "generate_facts", no_regeneration)
    second = load_facts(config, 3, tmp_path)
    assert second.qa.equals(first.qa) and second.tokenizer.to_str() == first.tokenizer.to_str()
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == mtimes
    # another seed or config is another folder
    assert facts.cache_key(config, 4) != facts.cache_key(config, 3)
    assert facts.cache_key(FactsConfig(num_entities=21, attributes=4, phrasings=2), 3) != facts.cache_key(config, 3)


def test_damaged_cache_is_rebuilt(tmp_path):
    config = FactsConfig(num_entities=10, attributes=2, phrasings=1)
    folder = load_facts(config, 0, tmp_path).folder
    (folder / "qa.parquet").write_bytes(b"not parquet")
    again = load_facts(config, 0, tmp_path)
    assert again.qa.equals(generate_facts(config, 0).qa)


def test_tokenizer_round_trips_every_string_without_unk(cached):
    tokenizer = cached.tokenizer
    unk = tokenizer.token_to_id("<unk>")
    assert [tokenizer.token_to_id(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>")] == [0, 1, 2, 3]
    strings = sorted(set(cached.strings()))
    for encoding, text in zip(tokenizer.encode_batch(strings), strings):
        assert unk not in encoding.ids, text
        assert tokenizer.decode(encoding.ids) == text
    # whitespace is normalised (runs collapse, ends are stripped), and an answer encodes alike alone and after
    # its question, so the answer tokens of "Q A" are the tokens of A
    assert tokenizer.decode(tokenizer.encode("  the  city of\tLisbon ").ids) == "the city of Lisbon"
    row = cached.qa.slice(0, 1).to_pylist()[0]
    joined = tokenizer.encode(f"{row['question']} {row['answer']}").ids
    assert joined == tokenizer.encode(row["question"]).ids + tokenizer.encode(row["answer"]).ids
