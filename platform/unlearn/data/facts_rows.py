"""The `facts` corpus as a job's dataset: one row per question-answer pair, classes = entities, superclasses =
categories, the held-out entities as the test part.

Why this shape. Every other axis of a job (forget scenarios, row stores, exact sharding, streams, checkpoints)
speaks rows with a label and a superclass. A QA pair is a row; its entity is its label (forgetting entities is
forgetting classes: TOFU's forget10 is `forget: {kind: class, fraction: 0.1}`), its category the superclass (a
category is a concept: `forget: {kind: concept, mismatch: target, target: painter, given_fraction: 0.5}` hands
over half of the painters). The never-trained entities are the test part: the membership non-members.

How a row travels. Its tokens are packed as a 3 x 1 x L float32 "image" (`qa_batches.pack_rows`): input ids,
labels (-100 outside the answer) and attention mask, right-padded to the corpus's longest pair. float32 holds
every integer below 2^24 exactly, so the row store, the streams and the workers carry it unchanged and the
language-modelling task unpacks it (`qa_batches.unpack_rows`) into the ids the model reads.

Which tokenizer. `dataset.tokenizer` when given (the job fills it with a `model.path` model's own folder: the
facts are tokenised by the model's tokenizer), else the corpus's BPE tokenizer.json. It is part of the dataset
spec, so a store built for one tokenizer is never read for another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unlearn.data.base import ImageDataset
from unlearn.data.facts import FactsConfig, FactsCorpus, load_facts
from unlearn.spec import DatasetSpec


def facts_config(spec: DatasetSpec) -> FactsConfig:
    """The corpus shape a dataset spec asks for (FactsSpec's defaults when it gives none)."""
    from unlearn.spec import FactsSpec

    return FactsConfig(**(spec.facts or FactsSpec()).model_dump())


def corpus_of(spec: DatasetSpec, seed: int, cache: str | Path) -> FactsCorpus:
    """The job's corpus (generated once, then read from the cache)."""
    return load_facts(facts_config(spec), seed, cache)


def tokenizer_path(spec: DatasetSpec, corpus: FactsCorpus) -> Path:
    """The tokenizer the rows are encoded with: `dataset.tokenizer`, else the corpus's tokenizer.json."""
    from unlearn.data.facts import TOKENIZER_FILE

    return Path(spec.tokenizer).expanduser() if spec.tokenizer else corpus.folder / TOKENIZER_FILE


def dataset_tokenizer(spec: DatasetSpec, seed: int, cache: str | Path, corpus: FactsCorpus | None = None) -> Any:
    """The job's tokenizer as a transformers tokenizer (with a pad token); `corpus`: the job's, where already read."""
    from unlearn.models.causal_lm import tokenizer_at

    corpus = corpus if corpus is not None else corpus_of(spec, seed, cache)
    return tokenizer_at(tokenizer_path(spec, corpus), "dataset.tokenizer")


@dataclass
class FactsTexts:
    """The text of each row of one part (train or test), in row order: what the evaluator scores beyond the tokens
    (paraphrased and perturbed answers for the truth ratio, the answer for ROUGE)."""

    entity: np.ndarray
    question: list[str]
    answer: list[str]
    paraphrase: list[str]
    perturbed: list[list[str]]

    def take(self, rows: np.ndarray) -> "FactsTexts":
        rows = np.asarray(rows, dtype=np.int64)
        return FactsTexts(self.entity[rows], [self.question[i] for i in rows], [self.answer[i] for i in rows],
                          [self.paraphrase[i] for i in rows], [self.perturbed[i] for i in rows])


def texts(corpus: FactsCorpus) -> dict[str, FactsTexts]:
    """{"train": trained entities' QA rows, "test": held-out entities' QA rows}, each in corpus table order: the
    row ids the dataset's parts use."""
    held_out = corpus.entities.column("held_out").to_numpy(zero_copy_only=False)
    entity = corpus.qa.column("entity_id").to_numpy()
    columns = {name: corpus.qa.column(name).to_pylist() for name in ("question", "answer", "paraphrase", "perturbed")}
    out = {}
    for part, mask in (("train", ~held_out[entity]), ("test", held_out[entity])):
        rows = np.flatnonzero(mask)
        out[part] = FactsTexts(entity[rows], *([columns[name][i] for i in rows] for name in
                                               ("question", "answer", "paraphrase", "perturbed")))
    return out


def load_facts_dataset(spec: DatasetSpec, seed: int, cache: str | Path) -> ImageDataset:
    """The corpus's QA rows tokenised and packed (see the module docstring), labelled by entity."""
    from unlearn.data.qa_batches import encode_qa, pack_rows

    corpus = corpus_of(spec, seed, cache)
    tokenizer = dataset_tokenizer(spec, seed, cache, corpus)
    parts = texts(corpus)
    encoded = {part: encode_qa(tokenizer, t.question, t.answer) for part, t in parts.items()}
    length = max(int(b.input_ids.shape[1]) for b in encoded.values())
    names = corpus.entities.column("name").to_pylist()
    return ImageDataset(
        name="facts",
        x_train=pack_rows(encoded["train"], length), y_train=parts["train"].entity,
        x_test=pack_rows(encoded["test"], length), y_test=parts["test"].entity,
        class_names=names, superclass_of=corpus.category_ids(), superclass_names=list(corpus.category_names))


__all__ = ["FactsTexts", "corpus_of", "dataset_tokenizer", "facts_config", "load_facts_dataset", "texts",
           "tokenizer_path"]
