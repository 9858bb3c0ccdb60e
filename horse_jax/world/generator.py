"""A synthetic world of facts, deterministic from a seed: the embedded default's knowledge.

Subjects are made-up pronounceable names; every subject has exactly one value for each relation
(birthplace, occupation, employer, language, favourite colour), drawn from per-relation vocabularies
of multi-word values. Each relation has five question templates: three are used in pre-training,
two are held out and only ever appear as evaluation rephrases, so generalization is measured on
phrasings the model never saw. The held-out templates recombine words of the training ones
("Which city is the birthplace of X?" from "In which city was X born?" and "What is the birthplace
of X?"), the way real paraphrases share content words.

Subjects are partitioned into the edit splits (meta-train / validation / test) and a locality pool.
Every fact of every subject is pre-trained (so edits change something the model knows); locality
questions ask about facts of locality-pool subjects, which no edit ever touches.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any

# ---------------------------------------------------------------------------------------------
# Vocabularies. Values are multi-word names, like real entities: the first word of a value
# determines the rest ("Avelin Bay" is the only city starting with "Avelin"), so an answer spans
# several tokens and its continuation is language knowledge shared by every subject with that value,
# while the first token carries the subject-specific fact. (Independent words would make each answer
# token a separate fact, unlike real names: "Barack" is followed by "Obama" whoever is asked about.)

_CITY_NAMES = ("Avelin", "Dorova", "Kethra", "Miravel", "Sorrin", "Talmor", "Vesk", "Ondara",
               "Brisca", "Calder", "Hollin", "Marrow", "Quenna", "Rusk", "Selby", "Tiber", "Ulvan",
               "Wyrne", "Zennor", "Fallow", "Garrow", "Ilsen", "Jorvik", "Lorne", "Nessa", "Pell",
               "Revel", "Tansy", "Varro", "Yarrow", "Ashby", "Brenn", "Corran", "Dunmore", "Esk",
               "Farran", "Glenn", "Harwick", "Islay", "Kirrin", "Lanark", "Morven", "Norra",
               "Orrin", "Penhal", "Rathe", "Stenn", "Trevel")
_CITY_KINDS = ("Bay", "Falls", "Harbour", "Springs", "Ridge", "Crossing")

OCCUPATIONS = (
    "marine biologist", "tax lawyer", "jazz pianist", "civil engineer", "pastry chef",
    "wildlife photographer", "school teacher", "airline pilot", "software developer",
    "tree surgeon", "opera singer", "museum curator", "crime novelist", "dental surgeon",
    "bridge architect", "ship captain", "radio presenter", "glass blower", "fashion designer",
    "mountain guide", "river pilot", "court reporter", "stage magician", "wine merchant",
    "clock maker", "data analyst", "street painter", "rail engineer", "flower grower",
    "chess coach", "sound engineer", "film editor", "bee keeper", "tailor apprentice",
    "police detective", "art restorer", "book binder", "yoga teacher", "toy maker", "map maker")

_COMPANY_NAMES = ("Zentrix", "Orvane", "Kalmora", "Brightel", "Vantor", "Quillon", "Helvar",
                  "Morrowind", "Tesseri", "Dunmere", "Corvell", "Polaris", "Ashgrove", "Nimbal",
                  "Arcway", "Bellcrest", "Cindral", "Dovetail", "Emberly", "Fenwick", "Graviton",
                  "Halcyon", "Ironvale", "Juniper", "Keystone", "Lumora", "Meridian", "Northwind",
                  "Oakhurst", "Pinnacle", "Quartzel", "Redfern", "Silvane", "Thornbury", "Umbral",
                  "Vireo", "Westmark", "Xylos", "Yellowfin", "Zephyra")
_COMPANY_KINDS = ("Labs", "Group", "Systems", "Foods", "Motors", "Bank")

_LANGUAGE_NAMES = ("Velsic", "Tamari", "Orsk", "Dunlan", "Kethic", "Marran", "Sylvish", "Aldric",
                   "Brevan", "Corish", "Drassic", "Elvane", "Fennic", "Galdor", "Hesper", "Istran",
                   "Jovic", "Kavari", "Lethic", "Mondric", "Norvic", "Oskan", "Pellish", "Quorran",
                   "Rhodic", "Saltic", "Torvan", "Umbric", "Valdic", "Wendish")
_LANGUAGE_KINDS = ("Creole", "Dialect", "Tongue")

COLOURS = (
    "sea green", "brick red", "midnight blue", "mustard yellow", "forest green", "sky blue",
    "blood orange", "rose pink", "ash grey", "lemon yellow", "plum purple", "slate grey",
    "sand beige", "ice white", "coal black", "rust brown", "mint green", "wine red", "ocean blue",
    "honey gold", "lilac purple", "peach orange", "moss green", "cherry red", "storm grey",
    "cream white", "jet black", "coffee brown", "salmon pink", "royal blue", "lime green",
    "ruby red", "steel blue", "chalk white", "olive green", "copper brown")


def _named(names, kinds):
  """"<name> <kind>" values, the kind a fixed function of the name."""
  return tuple(f"{n} {kinds[i % len(kinds)]}" for i, n in enumerate(names))


# ---------------------------------------------------------------------------------------------
# Relations and templates: (train templates, held-out evaluation templates). Every template is a
# question ending with "?", with "{s}" for the subject.


@dataclasses.dataclass(frozen=True)
class Relation:
  """One relation: its name, its value vocabulary and its question templates."""

  name: str
  values: tuple[str, ...]
  train_templates: tuple[str, ...]
  eval_templates: tuple[str, ...]


def relations() -> tuple[Relation, ...]:
  """The world's relations (fixed; the seed only draws subjects, values and splits).

  Each relation has four training templates, one of them subject-first, so that the held-out
  phrasings (both word orders occur among them) recombine patterns the model has seen.
  """
  return (
      Relation("birthplace", _named(_CITY_NAMES, _CITY_KINDS),
               ("Where was {s} born?", "What is the birthplace of {s}?",
                "In which city was {s} born?", "{s} was born where?"),
               ("Which city is the birthplace of {s}?", "{s} was born in which city?")),
      Relation("occupation", OCCUPATIONS,
               ("What is the occupation of {s}?", "What does {s} do for a living?",
                "What job does {s} have?", "{s} works as what?"),
               ("What is the job of {s}?", "What occupation does {s} have?")),
      Relation("employer", _named(_COMPANY_NAMES, _COMPANY_KINDS),
               ("Who is the employer of {s}?", "Which company does {s} work for?",
                "Where does {s} work?", "{s} is employed by which company?"),
               ("Which company is the employer of {s}?", "Who does {s} work for?")),
      Relation("language", _named(_LANGUAGE_NAMES, _LANGUAGE_KINDS),
               ("What language does {s} speak?", "What is the native language of {s}?",
                "Which language is spoken by {s}?", "{s} speaks which language?"),
               ("Which language does {s} speak?", "What is the language of {s}?")),
      Relation("colour", COLOURS,
               ("What is the favourite colour of {s}?", "Which colour does {s} like best?",
                "What colour does {s} love?", "{s} likes which colour best?"),
               ("What is the colour that {s} likes best?", "Which colour is the favourite of {s}?")),
  )


# ---------------------------------------------------------------------------------------------
# Names.

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
           "tr", "st", "th", "sh", "ch")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "th")


def _name(rng: random.Random) -> str:
  syllables = rng.choice((2, 2, 3))
  parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)]
  return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def make_subjects(rng: random.Random, n: int) -> list[str]:
  """`n` distinct made-up names (none equal to a vocabulary word)."""
  taken: set[str] = set()
  words = {w for rel in relations() for v in rel.values for w in v.split()}
  out = []
  while len(out) < n:
    name = _name(rng)
    if name in taken or name in words or len(name) < 4:
      continue
    taken.add(name)
    out.append(name)
  return out


# ---------------------------------------------------------------------------------------------
# The world.


@dataclasses.dataclass(frozen=True)
class WorldSpec:
  """Sizes of the world. Defaults build the shipped embedded default."""

  n_subjects: int = 1000
  n_train_subjects: int = 500  # meta-train edit split (2,500 edits)
  n_val_subjects: int = 40  # 200 validation edits
  n_test_subjects: int = 210  # x 5 relations = 1,050 test edits; 250 subjects stay for locality


@dataclasses.dataclass
class World:
  """Facts and splits.

  Attributes:
    seed: the seed it was built from.
    subjects: all subject names.
    facts: {subject: {relation: value}} — one value per (subject, relation).
    split_of: subject -> "train" | "val" | "test" | "pool".
    edits: split -> list of edit dicts (subject, relation, prompt, rephrase, target_new,
      ground_truth, loc_prompt, loc_answer).
  """

  seed: int
  subjects: list[str]
  facts: dict[str, dict[str, str]]
  split_of: dict[str, str]
  edits: dict[str, list[dict[str, str]]]

  @property
  def relations(self) -> tuple[Relation, ...]:
    return relations()


def build_world(seed: int = 0, spec: WorldSpec = WorldSpec()) -> World:
  """Draws subjects, their facts, the subject splits and the edit records.

  Args:
    seed: everything is a function of it.
    spec: sizes.

  Returns:
    The world.
  """
  rng = random.Random(seed)
  rels = relations()
  subjects = make_subjects(rng, spec.n_subjects)
  facts = {s: {r.name: rng.choice(r.values) for r in rels} for s in subjects}

  order = list(subjects)
  rng.shuffle(order)
  a = spec.n_train_subjects
  b = a + spec.n_val_subjects
  c = b + spec.n_test_subjects
  if c >= len(order):
    raise ValueError("edit splits need fewer subjects than the world has (a locality pool remains)")
  split_of = {s: "train" for s in order[:a]}
  split_of.update({s: "val" for s in order[a:b]})
  split_of.update({s: "test" for s in order[b:c]})
  split_of.update({s: "pool" for s in order[c:]})
  pool = order[c:]

  edits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
  for split, members in (("train", order[:a]), ("val", order[a:b]), ("test", order[b:c])):
    for s in members:
      for r in rels:
        truth = facts[s][r.name]
        new = rng.choice([v for v in r.values if v != truth])
        loc_s = rng.choice(pool)
        loc_r = rng.choice(rels)
        edits[split].append(dict(
            subject=s, relation=r.name,
            prompt=rng.choice(r.train_templates).format(s=s),
            rephrase=rng.choice(r.eval_templates).format(s=s),
            target_new=new, ground_truth=truth,
            loc_prompt=rng.choice(loc_r.train_templates).format(s=loc_s),
            loc_answer=facts[loc_s][loc_r.name]))
    rng.shuffle(edits[split])
  return World(seed, subjects, facts, split_of, edits)


def pretraining_pairs(world: World) -> list[tuple[str, str]]:
  """(question, answer) for every fact under every *training* template (held-out ones excluded).

  Locality questions are training-template questions about pool subjects, so they are included.
  """
  pairs = []
  for s in world.subjects:
    for r in world.relations:
      for t in r.train_templates:
        pairs.append((t.format(s=s), world.facts[s][r.name]))
  return pairs


def heldout_pairs(world: World) -> list[tuple[str, str]]:
  """(question, answer) for every fact under the held-out evaluation templates."""
  return [(t.format(s=s), world.facts[s][r.name])
          for s in world.subjects for r in world.relations for t in r.eval_templates]


# ---------------------------------------------------------------------------------------------
# Export in the formats the loaders read.


def to_zsre(edit: dict[str, str]) -> dict[str, Any]:
  """ZsRE / MEND record. The loaders append "?" to `loc`, so it is stored without it."""
  loc = edit["loc_prompt"]
  assert loc.endswith("?")
  return {"subject": edit["subject"], "src": edit["prompt"], "pred": edit["ground_truth"],
          "rephrase": edit["rephrase"], "alt": edit["target_new"],
          "answers": [edit["ground_truth"]], "loc": loc[:-1], "loc_ans": edit["loc_answer"],
          "cond": f"{edit['ground_truth']} >> {edit['target_new']} || {edit['prompt']}"}


def to_counterfact(edit: dict[str, str], case_id: int) -> dict[str, Any]:
  """CounterFact record in the EasyEdit JSON layout."""
  return {"case_id": case_id, "prompt": edit["prompt"], "target_new": edit["target_new"],
          "ground_truth": edit["ground_truth"], "rephrase_prompt": edit["rephrase"],
          "locality_prompt": edit["loc_prompt"], "locality_ground_truth": edit["loc_answer"],
          "subject": edit["subject"], "relation": edit["relation"]}


def facts_table(world: World) -> list[dict[str, str]]:
  """Flat list of every fact with its subject's split (for inspection and the pre-training check)."""
  return [{"subject": s, "relation": r.name, "answer": world.facts[s][r.name],
           "split": world.split_of[s]} for s in world.subjects for r in world.relations]


# ---------------------------------------------------------------------------------------------
# UnKE (unstructured editing): long free-text answers about world subjects.

UNKE_QUESTIONS = ("What do you know about {s}?", "Tell me about {s}.")


def _unke_paragraph(s: str, values: dict[str, str]) -> str:
  occupation = values["occupation"]
  article = "an" if occupation[0] in "aeiou" else "a"
  return (f"{s} was born in {values['birthplace']}. {s} works as {article} {occupation}. "
          f"{s} works for {values['employer']}. {s} speaks {values['language']}. "
          f"The favourite colour of {s} is {values['colour']}.")


def unke_records(world: World, n: int = 50, n_sub: int = 3) -> list[dict[str, Any]]:
  """UnKE-format records (question, para_question, answer, sub_question[], sub_answer[]).

  Each record rewrites all five facts of one test-split subject at once: the answer is a paragraph
  stating new values (each differs from the subject's true value), and the sub-questions ask
  `n_sub` of those facts with training templates, their sub-answers the new values. The draws use
  their own generator (seeded from the world seed), so the world's other data is unchanged.

  Args:
    world: the world.
    n: number of records (distinct test subjects, in test-split order).
    n_sub: sub-questions per record.

  Returns:
    The records.
  """
  rng = random.Random(f"unke:{world.seed}")
  subjects = list(dict.fromkeys(e["subject"] for e in world.edits["test"]))[:n]
  out = []
  for s in subjects:
    new = {r.name: rng.choice([v for v in r.values if v != world.facts[s][r.name]])
           for r in world.relations}
    asked = rng.sample(world.relations, n_sub)
    question, para = (t.format(s=s) for t in UNKE_QUESTIONS)
    out.append({"subject": s, "question": question, "para_question": para,
                "answer": _unke_paragraph(s, new),
                "sub_question": [rng.choice(r.train_templates).format(s=s) for r in asked],
                "sub_answer": [new[r.name] for r in asked]})
  return out


# ---------------------------------------------------------------------------------------------
# Many distinct edits (sequential-editing scale tests, e.g. 50,000 HoReN edits).


def distinct_edits(world: World, n: int = 50_000, seed: int | None = None,
                   progress: bool = False) -> list[dict[str, str]]:
  """`n` distinct edit requests about *new* subjects (not in the world), in a random order.

  Each new subject gets all five relations (n / 5 subjects, the last one partly), so no two
  requests share a (subject, relation). Prompts use a training template, rephrases a held-out one;
  the targets are drawn from the relation's values. New subjects have no pre-trained fact:
  `ground_truth` is another drawn value (so the target is counterfactual to it), only to fill the
  field the formats need. Locality pairs are training-template questions about pool subjects (never
  edited). The draws use their own generator, seeded from (`seed`, `n`), so the world's other data
  is unchanged; a stream of another length is another draw, not a prefix of this one.

  Args:
    world: the world (its names are avoided, its pool subjects give locality pairs).
    n: number of requests.
    seed: the stream's seed (default the world's seed).
    progress: a bar over the requests (drawn on a terminal only, `horse_jax.progress`).

  Returns:
    Edit dicts with the keys of `World.edits` (`to_zsre` / `to_counterfact` export them).
  """
  from horse_jax import progress as progress_lib  # noqa: PLC0415
  rng = random.Random(f"distinct:{world.seed if seed is None else int(seed)}:{n}")
  rels = relations()
  pool = [s for s in world.subjects if world.split_of[s] == "pool"]
  words = {w for rel in rels for v in rel.values for w in v.split()}
  taken = set(world.subjects)
  subjects: list[str] = []
  while len(subjects) * len(rels) < n:
    name = _name(rng)
    if name in taken or name in words or len(name) < 4:
      continue
    taken.add(name)
    subjects.append(name)
  out = []
  with progress_lib.bar(total=n, desc="drawing edits", unit="edit", disable=not progress) as bar:
    for s in subjects:
      for r in rels:
        truth, new = rng.sample(r.values, 2)
        loc_s, loc_r = rng.choice(pool), rng.choice(rels)
        out.append(dict(
            subject=s, relation=r.name,
            prompt=rng.choice(r.train_templates).format(s=s),
            rephrase=rng.choice(r.eval_templates).format(s=s),
            target_new=new, ground_truth=truth,
            loc_prompt=rng.choice(loc_r.train_templates).format(s=loc_s),
            loc_answer=world.facts[loc_s][loc_r.name]))
      bar.update(min(len(out), n) - min(len(out) - len(rels), n))
  out = out[:n]
  rng.shuffle(out)
  return out
