"""Fact recall: invented facts to inject (`FictionalFactsTask`), and real facts to check retention: real capitals
(`RealCapitalsTask`) and known facts of ten kinds, split into a validation and a test part (`KnownFactsTask`).

Each fact comes with a demonstration sentence in `solution` ("The capital of Veloria is Tarnfeld.") and
its attribute in `answer`. The train, val and eval splits ask about the SAME facts with DIFFERENT phrasings,
so val (for tuning) and eval (the held-out test) measure recall of a fact that is not in the context, through
a question never trained on. The verifier
checks that the answer appears as a whole word (case-insensitive).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lightning_sd.data.records import DataError
from lightning_sd.data.tasks.base import Task, Verdict, check_split


@dataclass(frozen=True)
class Fact:
    kind: str  # "capital" | "profession" | "hometown"
    entity: str
    answer: str


# kind -> (demonstration, {split: phrasings}); the three splits ask with disjoint phrasings: "train" is
# trained on, "val" is for tuning, "eval" is the held-out test
PHRASINGS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    "capital": ("The capital of {e} is {a}.",
                {"train": ("What is the capital of {e}?", "Which city is the capital of {e}?",
                           "Name the capital of {e}."),
                 "val": ("Tell me the capital city of {e}.", "Which city serves as the capital of {e}?"),
                 "eval": ("In which city is the government of {e} based?", "What city is {e}'s capital?")}),
    "profession": ("{e} works as {art} {a}.",
                   {"train": ("What is {e}'s profession?", "What does {e} do for a living?",
                              "What is {e}'s occupation?"),
                    "val": ("What line of work is {e} in?", "How does {e} earn a living?"),
                    "eval": ("What is {e}'s job?", "What kind of work does {e} do?")}),
    "hometown": ("{e} was born in {a}.",
                 {"train": ("Where was {e} born?", "In which town was {e} born?", "What is {e}'s hometown?"),
                  "val": ("Which town is {e} from originally?", "Name the town where {e} was born."),
                  "eval": ("What is the birthplace of {e}?", "{e} was born in which town?")}),
}

PROFESSIONS = ["baker", "astronomer", "beekeeper", "cartographer", "glassblower", "blacksmith", "librarian",
               "shipwright", "violinist", "potter", "lighthouse keeper", "watchmaker", "botanist", "tailor",
               "sculptor", "fisherman", "locksmith", "carpenter", "jeweler", "falconer"]

REAL_CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Germany", "Berlin"),
                 ("Spain", "Madrid"), ("the United Kingdom", "London"), ("Russia", "Moscow"), ("China", "Beijing"),
                 ("Egypt", "Cairo"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
                 ("Austria", "Vienna"), ("Norway", "Oslo"), ("Thailand", "Bangkok"), ("Canada", "Ottawa")]

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th",
           "tr", "vr"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o"]
_ENDS = {"given": ["ra", "na", "lin", "dor", "wen", "ric", "mo", "lla"],
               "country": ["ria", "land", "stan", "via", "mark", "nia", "dor"],
               "city": ["feld", "burg", "holm", "mere", "port", "ton", "wick", "grad"],
               "surname": ["ren", "wick", "dahl", "mont", "vik", "ssen", "ley"]}


def _word(rng: random.Random, end: str, syllables: int = 2) -> str:
    return ("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + end).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_word(rng, rng.choice(_ENDS['given']), 1)} {_word(rng, rng.choice(_ENDS['surname']))}"


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def invent_facts(n: int, kinds: tuple[str, ...], seed: int) -> list[Fact]:
    """`n` facts cycling through `kinds`, with unique invented names and unique answers."""
    rng = random.Random(f"facts/{seed}")
    used: set[str] = set()
    professions = rng.sample(PROFESSIONS, len(PROFESSIONS))

    def fresh(make) -> str:
        for _ in range(1000):
            w = make()
            if w.lower() not in used and not any(w.lower() in u or u in w.lower() for u in used):
                used.add(w.lower())
                return w
        raise DataError("fictional_facts: ran out of invented names")

    facts = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "capital":
            facts.append(Fact(kind, fresh(lambda: _word(rng, rng.choice(_ENDS["country"]))),
                              fresh(lambda: _word(rng, rng.choice(_ENDS["city"])))))
        elif kind == "profession":
            if not professions:
                raise DataError(f"fictional_facts: at most {len(PROFESSIONS)} profession facts")
            facts.append(Fact(kind, fresh(lambda: _person(rng)), professions.pop()))
        else:
            facts.append(Fact(kind, fresh(lambda: _person(rng)), fresh(lambda: _word(rng, rng.choice(_ENDS["city"])))))
    return facts


class FactsTask(Task):
    """Questions about a fixed list of facts; subclasses provide `self.facts`."""

    name = "facts"
    splits = ("train", "val", "eval")
    facts: list[Fact]
    instruction: str = "Answer in one sentence."

    def n_distinct(self, split: str) -> int:
        check_split(split, self.splits, self.name)
        return sum(len(PHRASINGS[f.kind][1][split]) for f in self.facts)

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """Passes over all facts in a seeded order, each pass asking with the next phrasing of the split, so
        the first `len(facts)` records cover every fact once; records repeat after `n_distinct(split)`."""
        check_split(split, self.splits, self.name)
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[dict] = []
        while len(out) < n:
            p = len(out) // len(self.facts)
            for j in rng.sample(range(len(self.facts)), len(self.facts))[: n - len(out)]:
                fact = self.facts[j]
                demo, phrasings = PHRASINGS[fact.kind]
                qs = phrasings[split]
                question = qs[(p + j) % len(qs)].format(e=fact.entity)
                solution = demo.format(e=fact.entity, a=fact.answer, art=_article(fact.answer))
                out.append({"prompt": f"{question} {self.instruction}".strip(), "solution": solution,
                            "answer": fact.answer, "id": f"{self.name}/{split}/{seed}/{len(out)}", "task": self.name,
                            "split": split, "kind": fact.kind, "entity": fact.entity})
        return out

    def verify(self, record: dict, completion: str) -> Verdict:
        found = re.search(rf"(?<!\w){re.escape(str(record['answer']))}(?!\w)", completion, re.IGNORECASE)
        return Verdict(reward=1.0 if found else 0.0)


class FictionalFactsTask(FactsTask):
    """`n_facts` invented facts (fictional countries and their capitals by default; `kinds` may add
    "profession" and "hometown" of fictional people). The facts depend on `world_seed` only, so train and
    eval records of any seed ask about the same facts."""

    name = "fictional_facts"

    def __init__(self, n_facts: int = 12, kinds: tuple[str, ...] = ("capital",), world_seed: int = 0,
                 instruction: str = "Answer in one sentence.") -> None:
        bad = [k for k in kinds if k not in PHRASINGS]
        if bad or not kinds:
            raise DataError(f"fictional_facts: kinds={kinds!r} must be a non-empty subset of {tuple(PHRASINGS)}")
        if n_facts < 1:
            raise DataError(f"fictional_facts: n_facts={n_facts} must be at least 1")
        self.facts = invent_facts(n_facts, tuple(kinds), world_seed)
        self.instruction = instruction


class RealCapitalsTask(FactsTask):
    """16 real capitals that small models mostly know: asked before and after training on new facts, it
    measures retention (forgetting)."""

    name = "real_capitals"

    def __init__(self, n_facts: int = len(REAL_CAPITALS), instruction: str = "Answer in one sentence.") -> None:
        if not 1 <= n_facts <= len(REAL_CAPITALS):
            raise DataError(f"real_capitals: n_facts={n_facts} must be between 1 and {len(REAL_CAPITALS)}")
        self.facts = [Fact("capital", country, city) for country, city in REAL_CAPITALS[:n_facts]]
        self.instruction = instruction


# Real facts SmolLM2-135M-Instruct answers right before any training (greedy, "Answer in one sentence.", 32 new
# tokens): 84 of 112 candidates of ten kinds. (kind, part, question, accepted answers); the part alternates within
# each kind: "val" for any search, "eval" only for reported numbers. None of them is a `REAL_CAPITALS` question.
KNOWN_FACTS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("capital", "val", 'What is the capital of Sweden?', ('Stockholm',)),
    ("capital", "eval", 'What is the capital of Poland?', ('Warsaw',)),
    ("capital", "val", 'What is the capital of Mexico?', ('Mexico City',)),
    ("capital", "eval", 'What is the capital of Argentina?', ('Buenos Aires',)),
    ("capital", "val", 'What is the capital of Kenya?', ('Nairobi',)),
    ("capital", "eval", 'What is the capital of India?', ('New Delhi', 'Delhi')),
    ("capital", "val", 'What is the capital of South Korea?', ('Seoul',)),
    ("capital", "eval", 'What is the capital of Peru?', ('Lima',)),
    ("capital", "val", 'What is the capital of Australia?', ('Canberra',)),
    ("capital", "eval", 'What is the capital of Denmark?', ('Copenhagen',)),
    ("capital", "val", 'What is the capital of Finland?', ('Helsinki',)),
    ("capital", "eval", 'What is the capital of Hungary?', ('Budapest',)),
    ("capital", "val", 'What is the capital of the Netherlands?', ('Amsterdam',)),
    ("capital", "eval", 'What is the capital of Belgium?', ('Brussels',)),
    ("capital", "val", 'What is the capital of Iran?', ('Tehran',)),
    ("capital", "eval", 'What is the capital of Indonesia?', ('Jakarta',)),
    ("capital", "val", 'What is the capital of Vietnam?', ('Hanoi',)),
    ("capital", "eval", 'What is the capital of Chile?', ('Santiago',)),
    ("capital", "val", 'What is the capital of Colombia?', ('Bogota', 'Bogotá')),
    ("capital", "eval", 'What is the capital of the Czech Republic?', ('Prague',)),
    ("capital", "val", 'What is the capital of Switzerland?', ('Bern',)),
    ("landmark", "val", 'In which country is the Eiffel Tower?', ('France',)),
    ("landmark", "eval", 'In which country is the Colosseum?', ('Italy',)),
    ("landmark", "val", 'In which country are the pyramids of Giza?', ('Egypt',)),
    ("landmark", "eval", 'In which country is the Great Wall?', ('China',)),
    ("landmark", "val", 'In which country is the Taj Mahal?', ('India',)),
    ("landmark", "eval", 'In which country is Machu Picchu?', ('Peru',)),
    ("landmark", "val", 'In which country is the Statue of Liberty?', ('United States', 'USA', 'America')),
    ("landmark", "eval", 'In which country is Big Ben?', ('England', 'United Kingdom', 'UK', 'Britain')),
    ("landmark", "val", 'In which country is the Acropolis?', ('Greece',)),
    ("landmark", "eval", 'In which country is Mount Fuji?', ('Japan',)),
    ("landmark", "val", 'In which country is the Sydney Opera House?', ('Australia',)),
    ("landmark", "eval", 'In which country is the Kremlin?', ('Russia',)),
    ("author", "val", 'Who wrote Romeo and Juliet?', ('Shakespeare',)),
    ("author", "eval", 'Who wrote Hamlet?', ('Shakespeare',)),
    ("author", "val", 'Who wrote Pride and Prejudice?', ('Austen',)),
    ("author", "eval", 'Who wrote the Harry Potter books?', ('Rowling',)),
    ("author", "val", 'Who wrote 1984?', ('Orwell',)),
    ("author", "eval", 'Who wrote The Odyssey?', ('Homer',)),
    ("author", "val", 'Who wrote Moby-Dick?', ('Melville',)),
    ("author", "eval", 'Who wrote The Lord of the Rings?', ('Tolkien',)),
    ("science", "val", 'What gas do plants absorb from the air?', ('carbon dioxide', 'CO2')),
    ("science", "eval", 'What is the chemical symbol for gold?', ('Au',)),
    ("science", "val", 'What is the chemical symbol for water?', ('H2O',)),
    ("science", "eval", 'What is the boiling point of water in degrees Celsius?', ('100',)),
    ("science", "val", 'Which organ pumps blood through the body?', ('heart',)),
    ("science", "eval", 'What do bees make?', ('honey',)),
    ("science", "val", 'What is the largest ocean on Earth?', ('Pacific',)),
    ("language", "val", 'What language is spoken in Brazil?', ('Portuguese',)),
    ("language", "eval", 'What language is spoken in Mexico?', ('Spanish',)),
    ("language", "val", 'What language is spoken in Germany?', ('German',)),
    ("language", "eval", 'What language is spoken in Japan?', ('Japanese',)),
    ("language", "val", 'What language is spoken in France?', ('French',)),
    ("language", "eval", 'What language is spoken in Italy?', ('Italian',)),
    ("language", "val", 'What language is spoken in Russia?', ('Russian',)),
    ("language", "eval", 'What language is spoken in China?', ('Chinese', 'Mandarin')),
    ("currency", "val", 'What is the currency of Japan?', ('yen',)),
    ("currency", "eval", 'What is the currency of the United Kingdom?', ('pound',)),
    ("currency", "val", 'What is the currency of the United States?', ('dollar',)),
    ("currency", "eval", 'What is the currency of India?', ('rupee',)),
    ("currency", "val", 'What is the currency of Russia?', ('ruble', 'rouble')),
    ("continent", "val", 'On which continent is Kenya?', ('Africa',)),
    ("continent", "eval", 'On which continent is Brazil?', ('South America',)),
    ("continent", "val", 'On which continent is France?', ('Europe',)),
    ("continent", "eval", 'On which continent is Japan?', ('Asia',)),
    ("continent", "val", 'On which continent is Canada?', ('North America',)),
    ("continent", "eval", 'On which continent is Egypt?', ('Africa',)),
    ("continent", "val", 'On which continent is Argentina?', ('South America',)),
    ("continent", "eval", 'On which continent is India?', ('Asia',)),
    ("person", "val", 'Who painted the Mona Lisa?', ('Leonardo', 'da Vinci')),
    ("person", "eval", 'Who developed the theory of relativity?', ('Einstein',)),
    ("person", "val", 'Who invented the telephone?', ('Bell',)),
    ("person", "eval", 'Who discovered penicillin?', ('Fleming',)),
    ("person", "val", 'Who was the first person to walk on the Moon?', ('Armstrong',)),
    ("person", "eval", 'Who proposed the theory of evolution by natural selection?', ('Darwin',)),
    ("nature", "val", 'What is the largest mammal?', ('blue whale', 'whale')),
    ("nature", "eval", 'What do caterpillars turn into?', ('butterfl', 'moth')),
    ("nature", "val", 'What is the largest desert in the world?', ('Sahara', 'Antarctic')),
    ("nature", "eval", 'What is the longest river in the world?', ('Nile', 'Amazon')),
    ("nature", "val", 'What is the tallest mountain in the world?', ('Everest',)),
    ("number", "val", 'How many days are there in a week?', ('seven', '7')),
    ("number", "eval", 'How many legs does a spider have?', ('eight', '8')),
    ("number", "val", 'How many sides does a triangle have?', ('three', '3')),
    ("number", "eval", 'How many months are in a year?', ('twelve', '12')),
)


class KnownFactsTask(Task):
    """A retention probe: real facts of ten kinds (capitals, landmarks, authors, science, languages, currencies,
    continents, people, nature, numbers) that the base model knows. Evaluated, never trained: "val" holds 44
    facts for searches, "eval" 40 others for reported numbers; "train" is empty. A completion is right when one
    of the fact's accepted answers appears in it (case-insensitive, at a word start: "butterfl" accepts
    "butterfly")."""

    name = "known_facts"
    splits = ("train", "val", "eval")

    def __init__(self, kinds: tuple[str, ...] | None = None, instruction: str = "Answer in one sentence.") -> None:
        known = sorted({k for k, *_ in KNOWN_FACTS})
        bad = [k for k in (kinds or ()) if k not in known]
        if bad or (kinds is not None and not kinds):
            raise DataError(f"known_facts: kinds={kinds!r} must be a non-empty subset of {known} (or null: all)")
        self.facts = [f for f in KNOWN_FACTS if kinds is None or f[0] in kinds]
        self.instruction = instruction

    def _part(self, split: str) -> list[tuple[str, str, str, tuple[str, ...]]]:
        check_split(split, self.splits, self.name)
        return [f for f in self.facts if f[1] == split]

    def n_distinct(self, split: str) -> int:
        return len(self._part(split))

    def records(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """The part's facts in a seeded order, repeating after `n_distinct(split)`; none for "train"."""
        part = self._part(split)
        if not part:
            return []
        rng = random.Random(f"{self.name}/{split}/{seed}")
        out: list[dict] = []
        while len(out) < n:
            for kind, _, question, answers in rng.sample(part, len(part))[: n - len(out)]:
                out.append({"prompt": f"{question} {self.instruction}".strip(), "solution": answers[0], "answer": answers[0],
                            "answers": list(answers), "id": f"{self.name}/{split}/{seed}/{len(out)}",
                            "task": self.name, "split": split, "kind": kind})
        return out

    def verify(self, record: dict, completion: str) -> Verdict:
        found = any(re.search(rf"(?<!\w){re.escape(str(a))}", completion, re.IGNORECASE)
                    for a in record.get("answers") or [record["answer"]])
        return Verdict(reward=1.0 if found else 0.0)
