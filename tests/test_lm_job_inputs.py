"""A language-model job's inputs on the `facts` dataset: the forget sets the job-level scenarios draw over its
entities (classes) and categories (superclasses), and the bad inputs it refuses before any work.

The forget sets: `forget: {kind: class, fraction: f}` counts as TOFU does (forget01 / 05 / 10: f of ALL entities,
held-out ones included, at least one), nests across fractions for one seed, differs across seeds and draws only
trained entities; `forget: {kind: concept, mismatch: target, target: <category>}` names the category by name or
id alike, and `given_fraction` hands over a seeded share of its trained entities, the rest of the category
staying in the target but out of both forget and retain; `validation_classes` draws a tuning forget set that
never touches the target.

The bad inputs (the `unlearn run` CLI, as a user meets them): each ends with one line naming the cause and exit
code 2, within seconds, with nothing written under --out.

Every job here shares one 40-entity corpus cache (built once per module; 4 entities held out, 8 per category).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from unlearn import cli
from unlearn.errors import BadInput

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

NUM_ENTITIES = 40
LLAMA = {"name": "causal_lm", "config": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2}}
FAIL_FAST_S = 15  # generous for a loaded CI machine; each case takes well under 5 s here (imports included)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _spec(cache: Path, forget: dict, seed: int = 0, **changes) -> dict:
    return {"name": "lm-inputs", "seed": seed,
            "dataset": {"name": "facts", "facts": {"num_entities": NUM_ENTITIES}},
            "model": LLAMA, "forget": forget, "methods": [{"name": "retrain"}],
            "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(cache), **changes}


def _prepare(cache: Path, forget: dict, seed: int = 0):
    from unlearn import spec as spec_mod
    from unlearn.job import prepare

    return prepare(spec_mod.validate(_spec(cache, forget, seed)))


def _classes(split) -> np.ndarray:
    return np.unique(split.y)


@pytest.fixture(scope="module")
def forget10(cache):
    return _prepare(cache, {"kind": "class", "fraction": 0.1})


@pytest.fixture(scope="module")
def entities(cache, forget10) -> dict[str, np.ndarray]:
    """{"trained": entity ids with training rows, "held_out": the corpus's never-trained entities}."""
    from unlearn.data.facts_rows import corpus_of

    corpus = corpus_of(forget10.spec.dataset, forget10.spec.seed, cache)
    trained = _classes(forget10.splits.train)
    assert np.array_equal(trained, corpus.entity_ids(held_out=False))  # the train part is the trained entities
    return {"trained": trained, "held_out": corpus.entity_ids(held_out=True)}


# --- forget sets -------------------------------------------------------------------------------------------------

def test_class_fraction_counts_as_tofu_and_nests(cache, forget10, entities):
    trained, held_out = entities["trained"], entities["held_out"]
    assert len(held_out) == 4 and len(trained) == NUM_ENTITIES - 4
    fractions = (0.01, 0.05, 0.10, 0.25)
    preps = {f: (forget10 if f == 0.10 else _prepare(cache, {"kind": "class", "fraction": f})) for f in fractions}
    drawn = {f: _classes(p.splits.forget) for f, p in preps.items()}
    # forget01 / 05 / 10 of 40 entities: 1 (at least one), 2, 4; 0.25 counts all 40 (10), not the 36 trained (9)
    assert [len(drawn[f]) for f in fractions] == [1, 2, 4, 10]
    for f, p in preps.items():
        s = p.splits
        assert s.label_level == "class" and s.num_outputs == NUM_ENTITIES
        assert s.describe["classes"] == drawn[f].tolist()
        assert np.isin(drawn[f], trained).all() and not np.isin(drawn[f], held_out).any()
        # every QA row of a forgotten entity is forgotten; the target is the forget set; the rest is retained
        assert np.array_equal(s.forget.index, np.flatnonzero(np.isin(s.train.y, drawn[f])))
        assert np.array_equal(s.target.index, s.forget.index) and np.array_equal(s.remain.index, s.retain.index)
        assert np.array_equal(_classes(s.retain), np.setdiff1d(trained, drawn[f]))
        assert not np.isin(held_out, _classes(s.train)).any()  # never-trained entities: test part only
    for small, large in zip(fractions, fractions[1:]):  # one seed's draws are nested
        assert np.isin(drawn[small], drawn[large]).all(), (small, large)
    other_seed = _classes(_prepare(cache, {"kind": "class", "fraction": 0.1}, seed=1).splits.forget)
    assert len(other_seed) == 4 and not np.array_equal(other_seed, drawn[0.10])


def test_category_by_name_or_id_and_given_fraction_hands_over_part(cache, forget10, entities):
    trained, held_out = entities["trained"], entities["held_out"]
    ds = forget10.dataset
    painter = ds.superclass_names.index("painter")
    painters = trained[ds.superclass_of[trained] == painter]  # the painters with training rows
    held_painters = held_out[ds.superclass_of[held_out] == painter]

    by_name = _prepare(cache, {"kind": "concept", "mismatch": "target", "target": "painter"}).splits
    by_id = _prepare(cache, {"kind": "concept", "mismatch": "target", "target": painter}).splits
    for s in (by_name, by_id):
        assert s.describe["target"] == painter
        assert np.array_equal(_classes(s.target), painters)
        assert np.array_equal(_classes(s.retain), np.setdiff1d(trained, painters))
    assert np.array_equal(by_name.target.index, by_id.target.index)
    assert np.array_equal(by_name.forget.index, by_id.forget.index)
    assert by_name.target_labels == by_id.target_labels

    handed_of = {}
    for share in (0.5, 0.01):
        s = _prepare(cache, {"kind": "concept", "mismatch": "target", "target": "painter",
                             "given_fraction": share}).splits
        handed = handed_of[share] = _classes(s.forget)
        assert len(handed) == max(1, round(share * len(painters))) and np.isin(handed, painters).all()
        rest = np.setdiff1d(painters, handed)
        assert len(rest) and np.array_equal(_classes(s.target), painters)
        # the rest of the category: in the target, handed over to no one, not retained...
        assert not np.isin(rest, _classes(s.forget)).any() and not np.isin(rest, _classes(s.retain)).any()
        assert np.array_equal(_classes(s.retain), np.setdiff1d(trained, painters))
        # ...but readable by the methods (remain = train minus the forget set)
        assert np.array_equal(s.remain.index, np.flatnonzero(~np.isin(s.train.y, handed)))
        # the held-out painters are test rows of the target, so no non-members of the other classes
        assert not np.isin(held_painters, np.union1d(_classes(s.test), _classes(s.validation))).any()
    # the share is a seeded draw: the category by id hands over the same painters
    by_id_half = _prepare(cache, {"kind": "concept", "mismatch": "target", "target": painter, "given_fraction": 0.5})
    assert np.array_equal(_classes(by_id_half.splits.forget), handed_of[0.5])


@pytest.mark.parametrize("forget, field", [
    ({"kind": "class", "fraction": 0.0}, "forget.fraction"),
    ({"kind": "class", "fraction": 0.95}, "forget.fraction"),  # 38 of 40 leaves none of the 36 trained to retain
    ({"kind": "concept", "mismatch": "target", "target": "painter", "given_fraction": 0.0}, "forget.given_fraction"),
    ({"kind": "entity", "fraction": 0.1}, "forget.kind"),
])
def test_bad_forget_arguments_are_bad_input(cache, forget10, forget, field):
    with pytest.raises(BadInput, match=field.replace(".", r"\.")):
        _prepare(cache, forget)


def test_validation_classes_never_touch_the_target(cache, forget10, entities):
    from unlearn.data.scenarios import validation_classes

    concept = _prepare(cache, {"kind": "concept", "mismatch": "target", "target": "writer", "given_fraction": 0.5})
    for prep in (forget10, concept):
        s = prep.splits
        for fraction in (0.05, 0.10):
            tuning = validation_classes(s, NUM_ENTITIES, fraction, seed=0)
            assert len(tuning) == max(1, round(fraction * NUM_ENTITIES))
            assert not np.isin(tuning, _classes(s.target)).any() and not np.isin(tuning, _classes(s.forget)).any()
            assert np.isin(tuning, _classes(s.retain)).all()  # trained entities outside the concept only
    # tuned on as `forget: {kind: class, classes: ...}`: the job's own forget set is retained data there
    tuning = validation_classes(forget10.splits, NUM_ENTITIES, 0.10, seed=0)
    tune = _prepare(cache, {"kind": "class", "classes": tuning}).splits
    assert _classes(tune.forget).tolist() == tuning
    assert np.isin(_classes(forget10.splits.forget), _classes(tune.retain)).all()


# --- bad inputs through the CLI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights_only(tmp_path_factory) -> Path:
    """A saved tiny llama with config and weights but no tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("weights-only")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64)).save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    return folder


def _refused(tmp_path: Path, capsys, monkeypatch, data: dict) -> str:
    """`unlearn run` on `data`: asserts exit 2, one `error:` line, within FAIL_FAST_S, nothing under --out."""
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    capsys.readouterr()  # only this run's output
    codes: list[int] = []
    started = time.monotonic()
    cli.main(["run", str(job), "--out", str(out)], exit=codes.append)
    took = time.monotonic() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert codes == [2], err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert took < FAIL_FAST_S, (took, err)
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not written, written  # stopped before any work: nothing trained, nothing saved
    return err[0]


def test_model_path_that_is_not_a_model_folder(tmp_path, capsys, monkeypatch, cache):
    folder = tmp_path / "tokenizer-only"  # e.g. a tokenizer folder given as the model
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    line = _refused(tmp_path, capsys, monkeypatch,
                    _spec(cache, {"kind": "class", "fraction": 0.1}, model={"name": "causal_lm", "path": str(folder)}))
    assert line.startswith("error: model.path: ") and "not a transformers model folder (no config.json)" in line, line


def test_model_folder_without_a_tokenizer(tmp_path, capsys, monkeypatch, cache, weights_only):
    line = _refused(tmp_path, capsys, monkeypatch, _spec(cache, {"kind": "class", "fraction": 0.1},
                                                         model={"name": "causal_lm", "path": str(weights_only)}))
    assert line.startswith("error: model.tokenizer: ") and "has no tokenizer files" in line, line
    assert "give model.tokenizer" in line, line


def test_lora_on_modules_the_model_lacks(tmp_path, capsys, monkeypatch, cache):
    model = {**LLAMA, "lora": {"target_modules": ["nope"]}}
    line = _refused(tmp_path, capsys, monkeypatch, _spec(cache, {"kind": "class", "fraction": 0.1}, model=model))
    assert line.startswith("error: model.lora.target_modules: 'nope'") and "q_proj" in line, line


def test_concept_category_that_does_not_exist(tmp_path, capsys, monkeypatch, cache):
    line = _refused(tmp_path, capsys, monkeypatch,
                    _spec(cache, {"kind": "concept", "mismatch": "target", "target": "poet"}))
    assert line.startswith("error: forget.target: superclass 'poet' is not in dataset 'facts'"), line
    assert "painter" in line, line  # the categories there are


def test_concept_category_id_out_of_range(tmp_path, capsys, monkeypatch, cache):
    line = _refused(tmp_path, capsys, monkeypatch,
                    _spec(cache, {"kind": "concept", "mismatch": "target", "target": 9}))
    assert line.startswith("error: forget.target: superclass 9 is not in dataset 'facts'") and "0..4" in line, line
