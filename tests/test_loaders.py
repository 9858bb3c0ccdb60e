"""Edit-record loaders: every format, JSON list / JSONL / CRLF, and one test per class of bad input."""

import json

import pytest

from horse_jax.data.loaders import load_records
from horse_jax.errors import UserError

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who sang nice day for a white wedding",
     "loc_ans": "Billy Idol", "cond": "x"},
    {"subject": "Zürich", "src": "Which river flows through Zürich?", "rephrase": "Zürich lies on which river?",
     "alt": "Limmat – Sihl", "answers": ["Limmat"], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"},
]
COUNTERFACT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
]
ROME = [
    {"case_id": 0, "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                                         "target_new": {"str": "English", "id": "Q1860"},
                                         "target_true": {"str": "French", "id": "Q150"}},
     "paraphrase_prompts": ["Shayna does this and Danielle Darrieux speaks", "Danielle Darrieux is fluent in"],
     "neighborhood_prompts": ["Michel Rocard is a native speaker of", "Jean Jaurès spoke"],
     "generation_prompts": ["Danielle Darrieux's mother tongue is"]},
]
WIKIBIGEDIT = [
    {"subject": "X", "update": "Who is the head coach of X?", "ans": "Jane Roe", "rephrase": "X's head coach is who?",
     "loc": "nq question: capital of peru", "loc_ans": "Lima", "personas": "Dude, who coaches X?",
     "mhop": "Where was the head coach of X born?", "mhop_ans": "Oslo"},
]
GENERIC = [{"prompt": "The sky is", "target": "green", "rephrase": "The colour of the sky is",
            "loc_prompt": "Grass is", "loc_answer": "green"},
           {"prompt": "Water boils at", "target": "50 degrees"}]


def write_json(path, rows, crlf=False):
  text = json.dumps(rows, indent=2, ensure_ascii=False)
  path.write_bytes((text.replace("\n", "\r\n") if crlf else text).encode("utf-8"))
  return path


def write_jsonl(path, rows, crlf=False):
  nl = "\r\n" if crlf else "\n"
  path.write_bytes(nl.join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8") + nl.encode())
  return path


@pytest.mark.parametrize("writer,crlf", [(write_json, False), (write_json, True), (write_jsonl, False),
                                         (write_jsonl, True)])
def test_zsre_all_containers(tmp_path, writer, crlf):
  path = writer(tmp_path / ("d.json" if writer is write_json else "d.jsonl"), ZSRE, crlf)
  recs = load_records(path)
  assert len(recs) == 2
  r = recs[0]
  assert r.prompt == ZSRE[0]["src"] and r.target == "University of Michigan"
  assert r.rephrase == ZSRE[0]["rephrase"]
  assert r.loc_prompt == "nq question: who sang nice day for a white wedding?" and r.loc_answer == "Billy Idol"
  assert r.ground_truth == "Illinois Institute of Technology"
  assert recs[1].prompt == "Which river flows through Zürich?" and recs[1].target == "Limmat – Sihl"  # unicode kept


def test_zsre_ans_and_portability(tmp_path):
  rows = [{"src": "Q?", "ans": "A", "rephrase": "Q2?", "loc": "L", "loc_ans": "B",
           "portability": [{"prompt": "P?", "answer": "C"}]}]
  r = load_records(write_jsonl(tmp_path / "m.jsonl", rows))[0]
  assert (r.target, r.loc_prompt, r.portability) == ("A", "L?", (("P?", "C"),))


def test_counterfact_uses_target_new(tmp_path):
  r = load_records(write_json(tmp_path / "cf.json", COUNTERFACT, crlf=True))[0]
  assert r.target == "English" and r.ground_truth == "French"
  assert r.rephrase.startswith("Where Danielle") and r.loc_prompt.startswith("Michel Rocard")
  assert r.loc_answer == "French"


def test_counterfact_rome(tmp_path):
  r = load_records(write_json(tmp_path / "rome.json", ROME))[0]
  assert r.prompt == "The mother tongue of Danielle Darrieux is"
  assert (r.target, r.ground_truth) == ("English", "French")
  assert r.rephrase == ROME[0]["paraphrase_prompts"][0]
  assert (r.loc_prompt, r.loc_answer) == ("Michel Rocard is a native speaker of", "French")
  assert r.extra["neighborhood_prompts"][1] == "Jean Jaurès spoke"


def test_wikibigedit(tmp_path):
  r = load_records(write_jsonl(tmp_path / "wbe.jsonl", WIKIBIGEDIT))[0]
  assert (r.prompt, r.target, r.rephrase) == ("Who is the head coach of X?", "Jane Roe", "X's head coach is who?")
  assert (r.loc_prompt, r.loc_answer) == ("nq question: capital of peru?", "Lima")
  assert r.portability == (("Dude, who coaches X?", "Jane Roe"), ("Where was the head coach of X born?", "Oslo"))


def test_generic_and_limit(tmp_path):
  path = write_json(tmp_path / "g.json", GENERIC)
  recs = load_records(path)
  assert [r.target for r in recs] == ["green", "50 degrees"]
  assert recs[1].rephrase is None and recs[1].loc_prompt is None
  assert [r.prompt for r in load_records(path, limit=1)] == ["The sky is"]


def test_explicit_format_checks_fields(tmp_path):
  path = write_json(tmp_path / "g.json", GENERIC)
  with pytest.raises(UserError, match=r"g\.json: record 0: missing field 'src'"):
    load_records(path, fmt="zsre")
  with pytest.raises(UserError, match="unknown data format 'nope'"):
    load_records(path, fmt="nope")


# ---- one test per class of malformed input: one line naming file, record and field ----


def assert_one_line(err, *parts):
  text = str(err.value)
  assert "\n" not in text
  for part in parts:
    assert part in text, (part, text)


def test_missing_field(tmp_path):
  rows = [dict(ZSRE[0]), {k: v for k, v in ZSRE[1].items() if k != "src"}]
  with pytest.raises(UserError) as err:
    load_records(write_jsonl(tmp_path / "bad.jsonl", rows))
  assert_one_line(err, "bad.jsonl", "record 1", "'src'", "missing")


def test_wrong_type(tmp_path):
  rows = [dict(ZSRE[0]), dict(ZSRE[1], alt=42)]
  with pytest.raises(UserError) as err:
    load_records(write_json(tmp_path / "bad.json", rows))
  assert_one_line(err, "bad.json", "record 1", "'alt'", "should be a string", "int")


def test_wrong_nested_type(tmp_path):
  row = json.loads(json.dumps(ROME[0]))
  row["requested_rewrite"]["target_new"] = "English"
  with pytest.raises(UserError) as err:
    load_records(write_json(tmp_path / "bad.json", [ROME[0], row]))
  assert_one_line(err, "bad.json", "record 1", "requested_rewrite.target_new")


def test_empty_target(tmp_path):
  rows = [dict(ZSRE[0]), dict(ZSRE[1], alt="  ")]
  with pytest.raises(UserError) as err:
    load_records(write_json(tmp_path / "bad.json", rows))
  assert_one_line(err, "bad.json", "record 1", "'alt'", "empty")


def test_not_json(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text('[{"src": "a", "alt": "b"},\n {"src": "c" "alt": "d"}]')
  with pytest.raises(UserError) as err:
    load_records(path)
  assert_one_line(err, "bad.json", "not valid JSON", "line 2")
  path = tmp_path / "bad.jsonl"
  path.write_text('{"src": "a", "alt": "b"}\n{"src": "c", \n')
  with pytest.raises(UserError) as err:
    load_records(path)
  assert_one_line(err, "bad.jsonl", "not valid JSON Lines", "line 2")


def test_unknown_format(tmp_path):
  with pytest.raises(UserError) as err:
    load_records(write_jsonl(tmp_path / "odd.jsonl", [{"query": "q", "reply": "a"}]))
  assert_one_line(err, "odd.jsonl", "record 0", "unknown format", "query, reply")


def test_not_an_object_and_missing_file(tmp_path):
  with pytest.raises(UserError) as err:
    load_records(write_json(tmp_path / "list.json", [GENERIC[0], ["x", "y"]]))
  assert_one_line(err, "list.json", "record 1", "JSON object")
  with pytest.raises(UserError) as err:
    load_records(tmp_path / "absent.json")
  assert_one_line(err, "absent.json", "not found")
  (tmp_path / "empty.json").write_text("\n")
  with pytest.raises(UserError, match="empty file"):
    load_records(tmp_path / "empty.json")


def test_skip_invalid_reports_and_skips(tmp_path, capsys):
  rows = [dict(ZSRE[0]), dict(ZSRE[1], alt=""), dict(ZSRE[0], src=None), dict(ZSRE[1])]
  path = write_json(tmp_path / "mixed.json", rows)
  recs = load_records(path, skip_invalid=True)
  assert [r.prompt for r in recs] == [ZSRE[0]["src"], ZSRE[1]["src"]]
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 3
  assert "record 1" in err[0] and "'alt'" in err[0] and "mixed.json" in err[0]
  assert "record 2" in err[1] and "'src'" in err[1]
  assert "skipped 2" in err[2]
  # limit counts kept records: the first two valid ones.
  assert len(load_records(path, skip_invalid=True, limit=2)) == 2
  with pytest.raises(UserError, match="no valid records"):
    load_records(write_json(tmp_path / "none.json", [dict(ZSRE[0], alt="")]), skip_invalid=True)
