"""The vocabulary of the `facts` corpus (data/facts.py): its categories, the kinds of fact each is asked, the
question templates, value pools and paraphrases.

How categories make concepts. Three of the attribute slots are category-specific (`SLOTS`): a writer is asked
for a genre, a best-known book and a literary prize, a scientist for a research field, a best-known discovery
and a science award, and so on, each with its own questions and value pool. The entities of one category thus
share question forms and vocabulary that no other category has: forgetting a category is forgetting a
concept, not a list of unrelated people. The other slots (birth city, birth year, native language, ...) are
common to every category, so the retain set still asks the same kinds of question.

Why a module of its own. This is the corpus's content, apart from how it is drawn, tokenised and cached
(data/facts.py): editing a template or a pool here changes every corpus, so bump `facts.VERSION` with it (the
cache key depends on it, and an old cache must never be read as the new corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

# The categories (the dataset's superclasses), in id order.
CATEGORIES = ("writer", "painter", "scientist", "athlete", "musician")


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


__all__ = ["ATTRIBUTE_KINDS", "CATEGORIES", "SLOTS", "AttributeKind"]
