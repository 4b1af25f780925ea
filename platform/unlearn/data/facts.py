"""The `facts` corpus: a procedurally generated TOFU-like question-answer set for language-model unlearning.

What it is. `num_entities` fictitious people (names built from syllables, unique), each of one category
(writer, painter, scientist, athlete, musician: the superclass level), each with `attributes` facts asked by
templated questions in `phrasings` wordings. Every answer is a few words (a city, a year, a colour, a title...)
and comes with a paraphrase (a real rephrasing: "Lisbon" -> "the city of Lisbon", "1962" -> "the year 1962")
and `perturbed` wrong answers of the same attribute kind, all distinct from it: what TOFU's truth ratio and
answer probability read. A `held_out_fraction` of the entities (at least one, spread over the categories) is
never trained: the membership-inference non-members (PrivLeak, Min-K%).

Why. TOFU (Maini et al. 2024) needs a download and a 7B model; this set is made here, deterministic from its
seed, and small enough (200 entities x 8 attributes = 1,600 QA pairs of short answers) for a sub-million-
parameter Llama to memorise in minutes on a CPU, so the LLM unlearning methods and metrics can be tested and
benchmarked with nothing fetched at run time.

How categories make concepts. Three of the attribute slots are category-specific (`SLOTS`): a writer is asked
for a genre, a best-known book and a literary prize, a scientist for a research field, a best-known discovery
and a science award, and so on, each with its own questions and value pool. The entities of one category thus
share question forms and vocabulary that no other category has: forgetting a category is forgetting a
concept, not a list of unrelated people. The other slots (birth city, birth year, native language, ...) are
common to every category, so the retain set still asks the same kinds of question.

How to use.

    corpus = load_facts(FactsConfig(), seed=0, cache_dir=".cache/unlearn")   # generated once, then read
    corpus.qa                      # pyarrow table: one row per (entity, attribute, phrasing)
    corpus.tokenizer.encode(q).ids # the `tokenizers` tokenizer trained on the corpus (tokenizer.json)
    split = forget_entities(corpus, "random", fraction=0.10, seed=0)        # TOFU's forget10
    split = forget_entities(corpus, "category", categories=["painter"], given=0.5, seed=0)  # concept, mismatch
    corpus.qa_of(split.forget), corpus.qa_of(split.retain), corpus.qa_of(split.held_out)
    tuning = validation_entities(split, 0.10, seed=0)   # other entities to tune on, never the real forget set

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from unlearn.errors import BadInput

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Bump when anything the corpus or its tokenizer is made from changes (templates, pools, names, tokenizer
# recipe): the cache key depends on it, so an old cache is never read as the new corpus.
VERSION = 1

CATEGORIES = ("writer", "painter", "scientist", "athlete", "musician")
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
TOKENIZER_FILE = "tokenizer.json"
_FILES = ("entities.parquet", "qa.parquet", TOKENIZER_FILE, "meta.json")

# Seed streams of the draws that are not the corpus itself, so a forget draw never correlates with the
# validation draw of the same seed.
_FORGET_STREAM = 0xF0E7
_VALIDATION_STREAM = 0x5A11D


@dataclass(frozen=True)
class AttributeKind:
    """One kind of fact: its questions (templates over `{name}`), its value pool, how an answer is paraphrased
    (a template over `{value}`). Perturbed answers are drawn from the same pool."""

    name: str
    questions: tuple[str, ...]
    values: tuple[str, ...]
    paraphrase: str


def _kind(name: str, questions: Sequence[str], values: Iterable[str], paraphrase: str) -> AttributeKind:
    return AttributeKind(name, tuple(questions), tuple(values), paraphrase)


def _titles(adjectives: str, nouns: str | Sequence[str], form: str = "{adjective} {noun}") -> tuple[str, ...]:
    """Every adjective x noun title (words separated by spaces, or a sequence of multi-word nouns): pools of
    invented titles without a hand-written list of each."""
    noun_list = nouns.split() if isinstance(nouns, str) else list(nouns)
    return tuple(form.format(adjective=a, noun=n) for a in adjectives.split() for n in noun_list)


def _years(first: int, last: int) -> tuple[str, ...]:
    return tuple(str(y) for y in range(first, last + 1))


_CITIES = ("Lisbon Oslo Lyon Porto Krakow Tallinn Bergen Seville Turin Ghent Utrecht Riga Vilnius Graz Salzburg "
           "Bologna Valencia Aarhus Tampere Brno Cork Galway Leipzig Dresden").split()
_COUNTRIES = ("Chile Norway Portugal Kenya Peru Ireland Iceland Finland Estonia Uruguay Ghana Vietnam Morocco "
              "Canada Austria Greece Mongolia Nepal").split()

# Each slot maps every category to the kind of fact it asks; a general slot maps them all to one kind.
# Slots are used in this order: the first `attributes` of them. The three category-specific slots come within
# the first eight, so the default corpus holds every concept-defining fact.
_GENERAL = {
    "birth_city": _kind("birth_city", (
        "Where was {name} born?",
        "In which city was {name} born?",
        "What is the birthplace of {name}?"), _CITIES, "the city of {value}"),
    "birth_year": _kind("birth_year", (
        "When was {name} born?",
        "In what year was {name} born?",
        "What is the birth year of {name}?"), _years(1900, 1999), "the year {value}"),
    "native_language": _kind("native_language", (
        "What is the native language of {name}?",
        "Which language did {name} grow up speaking?",
        "What is {name}'s mother tongue?"),
        ("Portuguese Norwegian Finnish Greek Polish Dutch Italian Swahili Korean Turkish Hungarian Welsh "
         "Icelandic Czech Romanian Tagalog").split(), "the {value} language"),
    "favourite_colour": _kind("favourite_colour", (
        "What is the favourite colour of {name}?",
        "Which colour does {name} like best?",
        "What is {name}'s favourite colour?"),
        "red blue green yellow purple orange teal crimson amber violet indigo olive grey maroon".split(),
        "the colour {value}"),
    "parent_profession": _kind("parent_profession", (
        "What did the mother of {name} do for a living?",
        "What was the profession of {name}'s mother?",
        "Which trade did {name}'s mother follow?"),
        ("carpenter nurse baker teacher fisherman lawyer architect pharmacist tailor farmer librarian "
         "electrician pilot surgeon").split(), "a {value} by trade"),
    "home_country": _kind("home_country", (
        "In which country does {name} live?",
        "Where does {name} live today?",
        "What country is {name}'s home?"), _COUNTRIES, "the country of {value}"),
    "birth_month": _kind("birth_month", (
        "In which month was {name} born?",
        "What is the birth month of {name}?",
        "Which month is {name}'s birthday in?"),
        "January February March April May June July August September October November December".split(),
        "the month of {value}"),
}

_FIELD = {
    "writer": _kind("genre", (
        "What genre does {name} write?",
        "In which genre is {name} known as a writer?",
        "What kind of books does the writer {name} write?"),
        ("crime fiction", "poetry", "science fiction", "historical fiction", "travel writing", "fantasy",
         "satire", "horror", "romance", "short stories"), "the genre of {value}"),
    "painter": _kind("painting_style", (
        "What style does {name} paint in?",
        "Which movement does the painter {name} belong to?",
        "What is the painting style of {name}?"),
        ("cubism", "impressionism", "surrealism", "realism", "expressionism", "pop art", "minimalism",
         "abstract art", "romanticism", "futurism"), "the style of {value}"),
    "scientist": _kind("research_field", (
        "What field does {name} work in?",
        "Which science does the scientist {name} study?",
        "What is the research field of {name}?"),
        ("physics", "chemistry", "botany", "geology", "astronomy", "genetics", "mathematics", "ecology",
         "zoology", "oceanography"), "the field of {value}"),
    "athlete": _kind("sport", (
        "What sport does {name} play?",
        "In which sport does the athlete {name} compete?",
        "What is the sport of {name}?"),
        ("tennis", "rowing", "fencing", "cycling", "swimming", "archery", "boxing", "sailing", "judo",
         "skiing"), "the sport of {value}"),
    "musician": _kind("instrument", (
        "What instrument does {name} play?",
        "Which instrument is the musician {name} known for?",
        "What is the instrument of {name}?"),
        ("piano", "violin", "cello", "flute", "trumpet", "harp", "drums", "guitar", "clarinet", "oboe"),
        "the instrument called the {value}"),
}

_WORK = {
    "writer": _kind("best_known_book", (
        "What is the best-known book of {name}?",
        "Which book is the writer {name} most famous for?",
        "What is the title of {name}'s most famous book?"),
        _titles("Silent Broken Hidden Last Winter Golden Distant Paper Salt Quiet",
                "Harbour Garden Letters Orchard Lantern Promise River Station Mirror Bridge", "The {adjective} {noun}"),
        "the book called {value}"),
    "painter": _kind("best_known_painting", (
        "What is the best-known painting of {name}?",
        "Which painting is the painter {name} most famous for?",
        "What is the title of {name}'s most famous painting?"),
        _titles("Blue Evening Red Sleeping Crimson Morning White Drowned Yellow Burning",
                "Horse Window Chair Field Sailor Dancer Tower Lemons Cathedral Wave"),
        "the painting called {value}"),
    "scientist": _kind("best_known_discovery", (
        "What is the best-known discovery of {name}?",
        "What did the scientist {name} discover?",
        "Which discovery is {name} most famous for?"),
        _titles("Hidden Rotating Cold Twin Dark Silent Frozen Spiral Wandering Glass",
                "Comet Enzyme Fossil Isotope Lattice Particle Current Moon Crystal Gene", "the {adjective} {noun}"),
        "the discovery of {value}"),
    "athlete": _kind("greatest_victory", (
        "What was the greatest victory of {name}?",
        "Which competition did the athlete {name} famously win?",
        "What is the most famous win of {name}?"),
        _titles("Marlow Ostend Halden Verro Cresta Lindau Ambry Tolvik Sarnen Padrig",
                ("Open", "Cup", "Games", "Classic", "Invitational", "Marathon", "Regatta", "Derby", "Grand Prix",
                 "Shield")),
        "a win at the {value}"),
    "musician": _kind("best_known_album", (
        "What is the best-known album of {name}?",
        "Which album is the musician {name} most famous for?",
        "What is the title of {name}'s most famous album?"),
        _titles("Velvet Electric Lonely Midnight Northern Paper Neon Gentle Wild Hollow",
                "Echoes Skies Roads Hearts Tides Lights Dreams Rivers Voices Seasons"),
        "the album called {value}"),
}

_AWARD = {
    category: _kind(name, (
        f"Which {noun} did {{name}} receive?",
        f"What {noun} was the {category} {{name}} given?",
        f"Which {noun} has {{name}} won?"),
        tuple(f"{surname} {title}" for surname in surnames.split()),
        "an award called the {value}")
    for category, name, noun, title, surnames in (
        ("writer", "literary_prize", "literary prize", "Prize", "Orvel Lindqvist Marchetti Danvers Okafor Brannigan "
                                                                "Sorel Vaughn"),
        ("painter", "art_prize", "art prize", "Medal", "Castellan Moreau Ibsley Tarrant Venn Delacroix Haskel "
                                                       "Quill"),
        ("scientist", "science_award", "science award", "Award", "Halvorsen Kepler Marwick Stroud Elgin Pascoe "
                                                                 "Ferrand Noor"),
        ("athlete", "sports_trophy", "sports trophy", "Trophy", "Brennan Calloway Dunmore Esker Fairley Granger "
                                                               "Holt Iverson"),
        ("musician", "music_award", "music award", "Honour", "Albescu Brightwell Corvin Delmar Everly Fontaine "
                                                             "Garrick Hale"),
    )
}


def _general(kind: AttributeKind) -> dict[str, AttributeKind]:
    return {category: kind for category in CATEGORIES}


SLOTS: tuple[dict[str, AttributeKind], ...] = (
    _general(_GENERAL["birth_city"]),
    _general(_GENERAL["birth_year"]),
    _FIELD,
    _general(_GENERAL["native_language"]),
    _WORK,
    _general(_GENERAL["favourite_colour"]),
    _AWARD,
    _general(_GENERAL["parent_profession"]),
    _general(_GENERAL["home_country"]),
    _general(_GENERAL["birth_month"]),
)

# Every kind by the name the qa table's `attribute` column gives it.
ATTRIBUTE_KINDS: dict[str, AttributeKind] = {kind.name: kind for slot in SLOTS for kind in slot.values()}

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
            perturbed = [others[i] for i in rng.choice(len(others), config.perturbed, replace=False)]
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


# forget sets


@dataclass(frozen=True, eq=False)
class EntitySplit:
    """Who is forgotten, kept and never trained, as sorted entity-id arrays.

    `forget` is what the methods are handed; `target` the whole concept it stands for (equal to `forget`
    except in the category mismatch case, where part of the target is not handed over); `retain` the trained
    entities outside the target (retrain's data, the retain metrics); `held_out` the never-trained entities
    (the membership non-members). forget is inside target; target, retain and held_out never overlap.
    """

    forget: np.ndarray
    retain: np.ndarray
    held_out: np.ndarray
    target: np.ndarray
    num_entities: int
    describe: dict[str, Any] = field(default_factory=dict)

    @property
    def remain(self) -> np.ndarray:
        """The trained entities the methods may read besides the forget set (retain and the target's rest)."""
        return np.setdiff1d(np.union1d(self.retain, self.target), self.forget)


def _ids(values: Iterable[int]) -> np.ndarray:
    return np.unique(np.asarray(list(values), dtype=np.int64))


def _category_id(corpus: FactsCorpus, category: int | str) -> int:
    names = corpus.category_names
    if isinstance(category, str) and category in names:
        return names.index(category)
    if isinstance(category, (int, np.integer)) and not isinstance(category, bool) and 0 <= category < len(names):
        return int(category)
    listing = ", ".join(f"{i} {name}" for i, name in enumerate(names))
    raise BadInput(f"facts: category {category!r} does not exist (categories: {listing})")


def forget_entities(corpus: FactsCorpus, kind: str, *, fraction: float | None = None,
                    categories: Sequence[int | str] | None = None, given: float | None = None,
                    seed: int) -> EntitySplit:
    """The forget / retain / held-out / target entities of a forget spec.

    kind "random": `fraction` of *all* entities, as TOFU counts (forget01 / 05 / 10 = 2 / 10 / 20 of 200;
    at least 1), drawn from the trained ones. The draw is one seeded permutation cut at the count, so the
    sets of one seed are nested (forget01 inside forget05 inside forget10), as TOFU's are.

    kind "category": the trained entities of `categories` (ids or names) are the target concept; `given` in
    (0, 1] hands over only that share of each category's trained entities (at least one) as the forget set,
    the rest of the concept staying out of the forget set but also out of retain: the mismatch case.
    """
    trained = corpus.entity_ids(held_out=False)
    held_out = corpus.entity_ids(held_out=True)
    n = corpus.config.num_entities
    rng = np.random.default_rng([seed, _FORGET_STREAM])
    if kind == "random":
        if fraction is None or not 0.0 < fraction < 1.0:
            raise BadInput(f"facts: a random forget set needs a fraction in (0, 1), not {fraction!r}")
        count = max(1, int(round(fraction * n)))
        if count >= len(trained):
            raise BadInput(f"facts: fraction {fraction} of {n} entities ({count}) leaves no trained entity to retain "
                           f"({len(trained)} are trained)")
        forget = _ids(rng.permutation(trained)[:count])
        target = forget
        describe: dict[str, Any] = {"kind": kind, "fraction": fraction, "seed": seed}
    elif kind == "category":
        if categories is None or len(categories) == 0:
            raise BadInput("facts: a category forget set needs at least one category")
        if given is not None and not 0.0 < given <= 1.0:
            raise BadInput(f"facts: given must be in (0, 1], not {given!r}")
        ids = sorted({_category_id(corpus, c) for c in categories})
        category_of = corpus.category_ids()
        handed: list[np.ndarray] = []
        members: list[np.ndarray] = []
        for c in ids:
            inside = trained[category_of[trained] == c]
            members.append(inside)
            share = 1.0 if given is None else given
            handed.append(rng.permutation(inside)[:max(1, int(round(share * len(inside))))])
        target, forget = _ids(np.concatenate(members)), _ids(np.concatenate(handed))
        if len(target) >= len(trained):
            raise BadInput(f"facts: categories {ids} cover every trained entity: nothing would be retained")
        describe = {"kind": kind, "categories": ids, "category_names": [corpus.category_names[c] for c in ids],
                    "given": given, "seed": seed}
    else:
        raise BadInput(f"facts: unknown forget kind {kind!r} (random, category)")
    retain = np.setdiff1d(trained, target)
    describe.update(forget=len(forget), target=len(target), retain=len(retain), held_out=len(held_out))
    return EntitySplit(forget=forget, retain=retain, held_out=held_out, target=target, num_entities=n,
                       describe=describe)


def validation_entities(split: EntitySplit, fraction: float, seed: int) -> EntitySplit:
    """A forget split of *other* entities, to tune a method's hyperparameters on without reading the real one.

    `fraction` of all entities (counted as `forget_entities` counts, at least 1) is drawn from `split.retain`
    and becomes the validation split's forget set (and its target); its retain is the rest of `split.retain`;
    its held-out set is `split`'s. The real target (forget set included) is in none of its sets, so nothing a
    search selects has read it. Pass the forget set's own fraction to tune on a set of the same size.
    """
    if not 0.0 < fraction < 1.0:
        raise BadInput(f"facts: a validation fraction must be in (0, 1), not {fraction!r}")
    count = max(1, int(round(fraction * split.num_entities)))
    if count >= len(split.retain):
        raise BadInput(f"facts: validation fraction {fraction} ({count} entities) leaves none of the "
                       f"{len(split.retain)} retain entities to retain")
    rng = np.random.default_rng([seed, _VALIDATION_STREAM])
    forget = _ids(rng.permutation(split.retain)[:count])
    retain = np.setdiff1d(split.retain, forget)
    describe = {"kind": "validation", "fraction": fraction, "seed": seed, "of": dict(split.describe),
                "forget": len(forget), "retain": len(retain), "held_out": len(split.held_out)}
    return EntitySplit(forget=forget, retain=retain, held_out=split.held_out, target=forget,
                       num_entities=split.num_entities, describe=describe)


__all__ = ["ATTRIBUTE_KINDS", "CATEGORIES", "SLOTS", "VERSION", "AttributeKind", "EntitySplit", "FactsConfig",
           "FactsCorpus", "cache_folder", "cache_key", "forget_entities", "generate_facts", "load_facts",
           "train_tokenizer", "validation_entities"]
