"""Fact recall: invented facts to inject (`FictionalFactsTask`) and real capitals to check retention
(`RealCapitalsTask`).

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
