"""The `facts` corpus: a procedurally generated TOFU-like question-answer set for language-model unlearning.

What it is. `num_entities` fictitious people (names built from syllables, unique), each of one category
(writer, painter, scientist, athlete, musician: the superclass level), each with `attributes` facts asked by
templated questions in `phrasings` wordings. Every answer is a few words (a city, a year, a colour, a title...)
and comes with a paraphrase (a real rephrasing: "Lisbon" -> "the city of Lisbon", "1962" -> "the year 1962")
and `perturbed` wrong answers of the same attribute kind, all distinct from it and worded like the paraphrase
("the city of Oslo"), as TOFU perturbs its paraphrased answers: what TOFU's truth ratio and
answer probability read. A `held_out_fraction` of the entities (at least one, spread over the categories) is
never trained: the membership-inference non-members (PrivLeak, Min-K%). What is asked and answered (categories,
templates, value pools, paraphrases) is data/facts_vocabulary.py; this module draws, tokenises and caches.

Why. TOFU (Maini et al. 2024) needs a download and a 7B model; this set is made here, deterministic from its
seed, and small enough (200 entities x 8 attributes = 1,600 QA pairs of short answers) for a sub-million-
parameter Llama to memorise in minutes on a CPU, so the LLM unlearning methods and metrics can be tested and
benchmarked with nothing fetched at run time.

How to use. A job names the dataset and what to forget; the corpus is a job dataset (data/facts_rows.py: classes
= entities, superclasses = categories, test part = held-out entities), so the generic forget scenarios
(data/scenarios.py) draw the forget sets:

    dataset: {name: facts, facts: {num_entities: 200}}
    forget: {kind: class, fraction: 0.1}              # TOFU's forget10: 10% of all entities, nested across fractions
    forget: {kind: concept, mismatch: target, target: painter, given_fraction: 0.5}   # half the painters handed over

(`scenarios.validation_classes` draws a forget set of other entities to tune on.) The corpus itself:

    corpus = load_facts(FactsConfig(), seed=0, cache_dir=".cache/unlearn")   # generated once, then read
    corpus.qa                      # pyarrow table: one row per (entity, attribute, phrasing)
    corpus.qa_of(corpus.entity_ids(held_out=True))   # the QA rows of some entities
    corpus.tokenizer.encode(q).ids # the `tokenizers` tokenizer trained on the corpus (tokenizer.json)

The tokenizer is a BPE over whitespace-separated words (Metaspace) with punctuation split off, so the tokens
of an answer are the same alone as after a question ("Q A" encodes to Q's ids + A's ids). Its normaliser
collapses runs of whitespace and strips the ends: `decode(encode(s)) == " ".join(s.split())`. Special tokens
are `<pad>` (id 0), `<bos>`, `<eos>`, `<unk>`; no post-processor adds them (the LM task frames sequences).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# ATTRIBUTE_KINDS and AttributeKind are re-exported: callers read the vocabulary from here too
from unlearn.data.facts_vocabulary import ATTRIBUTE_KINDS, CATEGORIES, SLOTS, AttributeKind
from unlearn.errors import BadInput

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Bump when anything the corpus or its tokenizer is made from changes (facts_vocabulary's templates and pools,
# names, tokenizer recipe): the cache key depends on it, so an old cache is never read as the new corpus.
VERSION = 2  # 2: perturbed answers worded like the paraphrase

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TOKENIZER_FILE = "tokenizer.json"
_FILES = ("entities.parquet", "qa.parquet", TOKENIZER_FILE, "meta.json")

# Names: 2-syllable first names, 2-3-syllable surnames, each ending in an optional coda ("Tavo Merilan").
_ONSETS = "b d f g k l m n p r s t v z br dr kr st th sh".split()
_VOWELS = "a e i o u ai ei ou".split()
_CODAS = ("", "", "n", "r", "l", "s", "th")


@dataclass(frozen=True)
class FactsConfig:
    """The shape of a facts corpus; with a seed it fixes every table (and the cache key)."""

    num_entities: int = 200
    attributes: int = 8  # the first `attributes` of SLOTS
    phrasings: int = 3  # question wordings per fact: the first `phrasings` templates of each kind
    perturbed: int = 3  # wrong answers per fact
    held_out_fraction: float = 0.1  # entities never trained (at least one)
    vocab_size: int = 1024  # BPE tokenizer target (reached only when the corpus has that many merges)

    def __post_init__(self) -> None:
        if self.num_entities < 2:
            raise BadInput(f"facts: num_entities must be at least 2 (one trained, one held out), "
                           f"not {self.num_entities}")
        if not 1 <= self.attributes <= len(SLOTS):
            raise BadInput(f"facts: attributes must be 1..{len(SLOTS)}, not {self.attributes}")
        kinds = [kind for slot in SLOTS[:self.attributes] for kind in slot.values()]
        most_phrasings = min(len(kind.questions) for kind in kinds)
        if not 1 <= self.phrasings <= most_phrasings:
            raise BadInput(f"facts: phrasings must be 1..{most_phrasings}, not {self.phrasings}")
        most_perturbed = min(len(kind.values) for kind in kinds) - 1
        if not 1 <= self.perturbed <= most_perturbed:
            raise BadInput(f"facts: perturbed must be 1..{most_perturbed} (the smallest value pool less the answer), "
                           f"not {self.perturbed}")
        if not 0.0 < self.held_out_fraction < 1.0:
            raise BadInput(f"facts: held_out_fraction must be in (0, 1), not {self.held_out_fraction}")
        if self.num_held_out >= self.num_entities:
            raise BadInput(f"facts: held_out_fraction {self.held_out_fraction} leaves no trained entity")
        if self.vocab_size < len(SPECIAL_TOKENS) + 1:
            raise BadInput(f"facts: vocab_size {self.vocab_size} is too small")

    @property
    def num_held_out(self) -> int:
        return max(1, int(round(self.held_out_fraction * self.num_entities)))


_ENTITIES_SCHEMA = pa.schema([
    pa.field("entity_id", pa.int64(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("category_id", pa.int64(), nullable=False),
    pa.field("category", pa.string(), nullable=False),
    pa.field("held_out", pa.bool_(), nullable=False),
])
_QA_SCHEMA = pa.schema([
    pa.field("entity_id", pa.int64(), nullable=False),
    pa.field("attribute", pa.string(), nullable=False),
    pa.field("phrasing", pa.int64(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),
    pa.field("paraphrase", pa.string(), nullable=False),
    pa.field("perturbed", pa.list_(pa.string()), nullable=False),
])


@dataclass
class FactsCorpus:
    """The entities and QA tables of one corpus, with its tokenizer and folder once loaded through the cache."""

    config: FactsConfig
    seed: int
    entities: pa.Table  # entity_id, name, category_id, category, held_out (row i = entity i)
    qa: pa.Table  # entity_id, attribute, phrasing, question, answer, paraphrase, perturbed (list<string>)
    category_names: list[str]
    tokenizer: "Tokenizer | None" = None
    folder: Path | None = None

    def entity_ids(self, held_out: bool | None = None) -> np.ndarray:
        """Sorted ids of every entity, or of the held-out (True) or trained (False) ones only."""
        ids = self.entities.column("entity_id").to_numpy()
        if held_out is None:
            return ids
        return ids[self.entities.column("held_out").to_numpy(zero_copy_only=False) == held_out]

    def category_ids(self) -> np.ndarray:
        """The category id of each entity, indexed by entity id."""
        return self.entities.column("category_id").to_numpy()

    def qa_of(self, entity_ids: Iterable[int]) -> pa.Table:
        """The QA rows of the given entities (in table order): a split's text."""
        wanted = pa.array(np.asarray(list(entity_ids), dtype=np.int64))
        return self.qa.filter(pc.is_in(self.qa.column("entity_id"), value_set=wanted))

    def strings(self) -> list[str]:
        """Every question, answer, paraphrase and perturbed answer (what the tokenizer must cover)."""
        out: list[str] = []
        for column in ("question", "answer", "paraphrase"):
            out.extend(self.qa.column(column).to_pylist())
        out.extend(s for row in self.qa.column("perturbed").to_pylist() for s in row)
        return out


# generation


def _syllables(rng: np.random.Generator, count: int) -> str:
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(count)]
    return ("".join(parts) + _CODAS[rng.integers(len(_CODAS))]).capitalize()


def _names(rng: np.random.Generator, n: int) -> list[str]:
    """`n` distinct invented full names (redrawn on a collision: the space is ~10^9, collisions are rare)."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        name = f"{_syllables(rng, 2)} {_syllables(rng, int(rng.integers(2, 4)))}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _held_out(rng: np.random.Generator, category_of: np.ndarray, count: int) -> np.ndarray:
    """A mask of `count` held-out entities spread over the categories (round-robin over each category's
    shuffled entities), so every concept has non-members for the membership attacks."""
    queues = [list(rng.permutation(np.flatnonzero(category_of == c))) for c in range(len(CATEGORIES))]
    mask = np.zeros(len(category_of), dtype=bool)
    chosen = 0
    while chosen < count:
        for queue in queues:
            if queue and chosen < count:
                mask[queue.pop(0)] = True
                chosen += 1
    return mask


def _article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def _paraphrase(kind: AttributeKind, value: str) -> str:
    text = kind.paraphrase.format(value=value)
    if text.startswith("a ") and _article(value) == "an":  # "an architect by trade"
        text = "an " + text[2:]
    return text


def generate_facts(config: FactsConfig, seed: int) -> FactsCorpus:
    """Make the corpus of `config` from `seed` (numpy default_rng): the same arguments give the same tables."""
    rng = np.random.default_rng(seed)
    n = config.num_entities
    names = _names(rng, n)
    # balanced categories: each holds n / 5 entities (the first n % 5 categories one more), in random order
    category_of = rng.permutation(np.arange(n) % len(CATEGORIES))
    held_out = _held_out(rng, category_of, config.num_held_out)
    entities = pa.table({
        "entity_id": np.arange(n, dtype=np.int64),
        "name": names,
        "category_id": category_of.astype(np.int64),
        "category": [CATEGORIES[c] for c in category_of],
        "held_out": held_out,
    }, schema=_ENTITIES_SCHEMA)

    rows: dict[str, list[Any]] = {name: [] for name in _QA_SCHEMA.names}
    for entity in range(n):
        category = CATEGORIES[category_of[entity]]
        for slot in SLOTS[:config.attributes]:
            kind = slot[category]
            answer = kind.values[rng.integers(len(kind.values))]
            others = [v for v in kind.values if v != answer]
            # worded as the paraphrase is ("the city of Oslo" beside "the city of Lisbon"), as TOFU perturbs its
            # paraphrased answer: the truth ratio then compares like with like, not a bare word with a phrase
            perturbed = [_paraphrase(kind, others[i]) for i in rng.choice(len(others), config.perturbed, replace=False)]
            for phrasing in range(config.phrasings):  # the first `phrasings` wordings: the same ones for every fact
                rows["entity_id"].append(entity)
                rows["attribute"].append(kind.name)
                rows["phrasing"].append(phrasing)
                rows["question"].append(kind.questions[phrasing].format(name=names[entity]))
                rows["answer"].append(answer)
                rows["paraphrase"].append(_paraphrase(kind, answer))
                rows["perturbed"].append(perturbed)
    qa = pa.table(rows, schema=_QA_SCHEMA)
    return FactsCorpus(config=config, seed=seed, entities=entities, qa=qa, category_names=list(CATEGORIES))


# tokenizer


def train_tokenizer(strings: Sequence[str], vocab_size: int) -> "Tokenizer":
    """A BPE tokenizer trained on `strings` whose alphabet holds every character in them (so none is <unk>)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    # prepend "always": a word's tokens do not depend on whether it starts the text, so an answer encodes the
    # same alone as after its question
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation("isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    alphabet = sorted(set("".join(strings)) - {" "} | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False)
    tokenizer.train_from_iterator(strings, trainer)
    return tokenizer


# cache


def cache_key(config: FactsConfig, seed: int) -> str:
    """Content hash of what the corpus depends on: the config, the seed and VERSION."""
    blob = json.dumps({"config": asdict(config), "seed": seed, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_folder(config: FactsConfig, seed: int, cache_dir: str | Path) -> Path:
    """Where `load_facts` keeps the corpus of (config, seed) under `cache_dir`."""
    return Path(cache_dir) / "data" / f"facts-{cache_key(config, seed)}"


def _write(corpus: FactsCorpus, folder: Path) -> None:
    """Write the corpus and a freshly trained tokenizer into a temporary sibling, then rename it into place:
    a reader sees the whole folder or none. A concurrent writer that renamed first wins (same content)."""
    import pyarrow.parquet as pq

    tokenizer = train_tokenizer(corpus.strings(), corpus.config.vocab_size)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the corpus from other users of a shared cache
        pq.write_table(corpus.entities, tmp / "entities.parquet", compression="zstd")
        pq.write_table(corpus.qa, tmp / "qa.parquet", compression="zstd")
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        meta = {"version": VERSION, "seed": corpus.seed, "config": asdict(corpus.config),
                "category_names": corpus.category_names}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read(config: FactsConfig, seed: int, folder: Path) -> FactsCorpus:
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("version") != VERSION or meta.get("seed") != seed or meta.get("config") != asdict(config):
        raise ValueError(f"{folder}: meta.json does not describe this corpus")
    return FactsCorpus(
        config=config, seed=seed,
        entities=pq.read_table(folder / "entities.parquet", schema=_ENTITIES_SCHEMA),
        qa=pq.read_table(folder / "qa.parquet", schema=_QA_SCHEMA),
        category_names=list(meta["category_names"]),
        tokenizer=Tokenizer.from_file(str(folder / TOKENIZER_FILE)),
        folder=folder,
    )


def load_facts(config: FactsConfig, seed: int, cache_dir: str | Path = ".cache/unlearn") -> FactsCorpus:
    """The corpus with its tokenizer: read from `<cache_dir>/data/facts-<key>/`, or generated and cached there."""
    folder = cache_folder(config, seed, Path(cache_dir).resolve())
    if all((folder / name).is_file() for name in _FILES):
        try:
            return _read(config, seed, folder)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt
            print(f"facts: cache unreadable ({exc}); regenerating {folder}", file=sys.stderr, flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():  # a folder missing files was not written by `_write`: replace it
        shutil.rmtree(folder, ignore_errors=True)
    _write(generate_facts(config, seed), folder)
    return _read(config, seed, folder)


__all__ = ["ATTRIBUTE_KINDS", "CATEGORIES", "SLOTS", "TOKENIZER_FILE", "VERSION", "AttributeKind", "FactsConfig",
           "FactsCorpus", "cache_folder", "cache_key", "generate_facts", "load_facts", "train_tokenizer"]
