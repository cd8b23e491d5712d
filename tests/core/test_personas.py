import gzip
import hashlib
import io
import json
import math
import random
import re
import tomllib
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sao_core.config import PersonasConfig
from sao_core.errors import PersonaSourceError
from sao_core.method import personas
from sao_core.method.personas import (
    builtin_attributes,
    builtin_lists,
    builtin_persona,
    builtin_size,
    persona_id,
)
from sao_core.stages.persona_sources import read_persona_file, sample_personas
from sao_core.store.storage import remove, write_bytes

# Persona Hub's persona.jsonl shape: one {"persona": ...} object per line. Texts written for these tests.
PERSONAS = [
    "A harbour master who keeps detailed logs of tides and wants to explain them to visiting sailors.",
    "A retired lighthouse keeper writing a guide to coastal birds.",
    "A community nurse who organises vaccination clinics in remote villages.",
    "A data journalist investigating how cities spend their road maintenance budgets.",
    "A violin maker who experiments with locally sourced tonewoods.",
    "A primary school teacher building a reading programme for reluctant readers.",
    "A food scientist developing shelf-stable meals for mountain rescue teams.",
    "An apprentice electrician studying for a wiring regulations exam.",
    "A translator of Portuguese poetry preparing a bilingual anthology.",
    "A hospital porter who volunteers as a chess coach at a youth club.",
    "A wheelchair basketball player planning a coaching clinic.",
    "A graduate student modelling groundwater flow in karst landscapes.",
]


def _builtin(n: int) -> PersonasConfig:
    return PersonasConfig(source="builtin", n=n)


def _file(url: str, n: int, column: str = "persona") -> PersonasConfig:
    return PersonasConfig(source="file", path=url, n=n, column=column)


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _csv(rows: list[dict]) -> bytes:
    import csv

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def _parquet(rows: list[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


ENCODERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}


@pytest.fixture(params=["local", "memory"])
def folder(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
    else:
        url = f"memory://personas-{uuid.uuid4().hex[:8]}"
        yield url
        remove(url, recursive=True)


# --- ids -----------------------------------------------------------------------------------------------


def test_persona_id_is_stable_and_ignores_spacing():
    pid = persona_id("A beekeeper who writes poems.")
    assert re.fullmatch(r"pe-[0-9a-f]{16}", pid)
    assert pid == persona_id("  A beekeeper\nwho   writes\tpoems. ")
    assert pid != persona_id("A beekeeper who writes poems!")
    assert pid == "pe-" + __import__("hashlib").sha256(b"A beekeeper who writes poems.").hexdigest()[:16]


# --- builtin -------------------------------------------------------------------------------------------


def test_builtin_lists_are_distinct_non_blank_and_in_digit_order():
    lists = builtin_lists()
    assert list(lists) == ["template", "occupation", "experience", "trait", "interest", "goal", "context"]
    for name, values in lists.items():
        assert values, f"{name} is empty"
        assert len(set(values)) == len(values), f"{name} repeats an entry"
        assert all(isinstance(v, str) and v.strip() and v == " ".join(v.split()) for v in values), name
    for template in lists["template"]:
        assert sorted(re.findall(r"\{(\w*)\}", template)) == ["a", "c", "g", "i", "t"], template
    assert builtin_lists() is lists  # read once per process
    assert builtin_size() == math.prod(len(v) for v in lists.values())
    assert builtin_size() >= 100_000_000  # the paper's 60k per round, for many rounds
    with pytest.raises(IndexError, match="outside"):
        builtin_persona(builtin_size())
    with pytest.raises(IndexError):
        builtin_persona(-1)


def test_builtin_data_is_package_data():
    # Installed from a wheel, the lists are there only if pyproject.toml ships sao_core/data.
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "data/**" in pyproject["tool"]["setuptools"]["package-data"]["sao_core"]
    assert personas._builtin_data().is_file()


def test_builtin_space_is_pinned():
    # Seeds must keep meaning the same personas across releases: editing a list changes this on purpose.
    assert builtin_size() == 679_024_281_600
    assert builtin_persona(0) == (
        "A newly qualified primary school teacher who is methodical and patient, currently preparing for a "
        "professional licensing exam while raising two young children, with a long-standing interest in "
        "urban beekeeping."
    )
    got = [r["persona_id"] for r in sample_personas(_builtin(3), seed=0)]
    assert got == ["pe-32626069ffedd363", "pe-310d77d3d21d6a50", "pe-d1c4b0625ed152f2"]


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


# sha256 of the sorted-key JSON of what the builtin source gave, taken from the code before the attribute
# lists moved out of sao_core/method/personas.py into sao_core/data/personas/builtin.yaml. An entry added,
# removed, edited or moved, or a change to the index maths or the sampling, changes them: update them
# only on purpose, since the seeds of earlier rounds then name other personas.
BUILTIN_SAMPLE_DIGESTS = [
    (50, 0, 0, "dee1d7bb94f1a20595abfc38d6fba76e08c4867889dac9d34d7c58d76ad69f10"),
    (50, 1, 0, "e7fb076b9ad371240b10d9b9f082324c04581c4abde4e12799f7c6ca8c7b8102"),
    (50, 12345, 0, "31e7eebc956055813c9810e41110ad4049bd3656054725d7a220bef15d0faca0"),
    (2000, 7919, 0, "aae0ecca2e75e0372505a987330456305c4c0076875bcd014cc1132c8b360e48"),
    # exclude the first 25 personas of the same seed, as a later round of a campaign does
    (50, 1, 25, "452e1112b76827ed6503ef9041bcc2083057984227d3bef237b790ae10f82621"),
]


@pytest.mark.parametrize(("n", "seed", "n_excluded", "digest"), BUILTIN_SAMPLE_DIGESTS)
def test_builtin_samples_match_their_pinned_digests(n, seed, n_excluded, digest):
    used = (
        {r["persona_id"] for r in sample_personas(_builtin(n_excluded), seed=seed)} if n_excluded else set()
    )
    assert _digest(sample_personas(_builtin(n), seed=seed, exclude_ids=used)) == digest


def test_builtin_entries_match_their_pinned_digests():
    # Indices with every digit 0 but one walk each list entry by entry, in order; then the last index.
    indices, step = [], 1
    for values in builtin_lists().values():
        indices += [k * step for k in range(len(values))]
        step *= len(values)
    indices.append(step - 1)
    assert len(indices) == 563
    # Taken from the code before the lists became data files, like BUILTIN_SAMPLE_DIGESTS.
    assert _digest([builtin_persona(i) for i in indices]) == (
        "991f7dbf2ed190e0b6d23c337b75c36ed479e3add16dffa6f09a3063095e4d0a"
    )
    assert _digest([builtin_attributes(i) for i in indices]) == (
        "674625a1fa904f3ecdba262f633a9d426459737cf09955daca175c9b102403a1"
    )


def _lists_yaml(**change: object) -> str:
    lists: dict[str, object] = {
        "context": ["living abroad", "working nights"],  # out of digit order on purpose
        "template": ["{a} who is {t}, {g} while {c}, likes {i}.", "While {c}, {a} ({t}) is {g}; {i}."],
        "occupation": ["nurse", "baker"],
        "experience": ["seasoned"],
        "trait": ["cautious", "curious"],
        "interest": ["chess"],
        "goal": ["moving house"],
    }
    lists.update(change)
    return yaml.safe_dump({k: v for k, v in lists.items() if v is not None}, sort_keys=False)


def test_builtin_data_loads_in_digit_order(tmp_path):
    path = tmp_path / "builtin.yaml"
    path.write_text(_lists_yaml())
    lists = personas._read_builtin_lists(path)
    assert list(lists) == ["template", "occupation", "experience", "trait", "interest", "goal", "context"]
    assert lists["occupation"] == ("nurse", "baker")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "does not exist"),
        ("template: [\n", "is not valid YAML"),
        ("", "holds NoneType, not a mapping"),
        ("- nurse\n- baker\n", "holds list, not a mapping"),
        (_lists_yaml(goal=None), "missing: ['goal']"),
        (_lists_yaml(hobby=["chess"]), "unknown: ['hobby']"),
        (_lists_yaml() + "trait: [shy]\n", "repeated: ['trait']"),
        (_lists_yaml(trait=[]), "'trait' must be a non-empty list"),
        (_lists_yaml(trait="cautious"), "'trait' must be a non-empty list"),
        (_lists_yaml(trait=["cautious", ""]), "trait entry 2 is ''"),
        (_lists_yaml(trait=["cautious", "  "]), "trait entry 2 is '  '"),
        (_lists_yaml(trait=[" cautious"]), "trait entry 1 is ' cautious'"),
        (_lists_yaml(trait=["dry  witted"]), "trait entry 1 is 'dry  witted'"),
        (_lists_yaml(trait=[True]), "trait entry 1 is True"),
        (_lists_yaml(trait=["cautious", "shy", "cautious"]), "trait repeats ['cautious']"),
        (_lists_yaml(template=["{a} who is {t}, likes {i}."]), "must use each of"),
        (_lists_yaml(template=["{a} {a} {t} {i} {g} {c}"]), "must use each of"),
        (_lists_yaml(template=["{a} who is {t} {i} {g} {c"]), "is malformed"),
    ],
)
def test_bad_builtin_data_gets_a_clear_error_naming_the_file(tmp_path, text, expected):
    path = tmp_path / "builtin.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(PersonaSourceError, match=re.escape(expected)) as err:
        personas._read_builtin_lists(path)
    assert f"builtin persona data {path}" in str(err.value)


def test_builtin_data_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "builtin.yaml"
    path.write_bytes(b"trait: [caf\xe9]\n")
    with pytest.raises(PersonaSourceError, match=re.escape(f"builtin persona data {path} cannot be read")):
        personas._read_builtin_lists(path)


def test_builtin_digits_each_change_the_text():
    index = 123_456_789
    base = builtin_persona(index)
    step = 1
    for values in builtin_lists().values():
        neighbour = index + step if (index // step) % len(values) + 1 < len(values) else index - step
        assert builtin_persona(neighbour) != base
        step *= len(values)


@pytest.mark.parametrize(
    ("phrase", "article"),
    [
        ("seasoned nurse", "a"),
        ("early-career nurse", "an"),
        ("experienced baker", "an"),
        ("university lecturer", "a"),
        ("MRI technician", "an"),
        ("X-ray technician", "an"),
        ("UX designer", "a"),
        ("hourly worker", "an"),
        ("one-person team", "a"),
    ],
)
def test_article_goes_by_sound(phrase, article):
    assert personas._article(phrase) == article


@pytest.fixture(scope="module")
def builtin_20k():
    return sample_personas(_builtin(20_000), seed=7)


def _template_patterns() -> list[re.Pattern[str]]:
    out = []
    for template in builtin_lists()["template"]:
        pattern = re.escape(template)
        for key in "atigc":
            pattern = pattern.replace(re.escape("{" + key + "}"), f"(?P<{key}>.+?)")
        out.append(re.compile(pattern, re.IGNORECASE))
    return out


def test_builtin_sample_is_distinct_and_deterministic(builtin_20k):
    rows = builtin_20k
    assert len(rows) == 20_000
    assert len({r["persona_id"] for r in rows}) == 20_000
    assert len({r["persona"] for r in rows}) == 20_000
    assert {r["source"] for r in rows} == {"builtin"}
    assert all(r["persona_id"] == persona_id(r["persona"]) for r in rows)
    assert sample_personas(_builtin(20_000), seed=7) == rows
    other = sample_personas(_builtin(200), seed=8)
    assert len({r["persona_id"] for r in other} & {r["persona_id"] for r in rows[:200]}) < 5


def test_builtin_sample_is_varied_and_well_formed(builtin_20k):
    patterns = _template_patterns()
    templates: Counter[int] = Counter()
    occupations: Counter[str] = Counter()
    words: Counter[str] = Counter()
    for row in builtin_20k:
        text = row["persona"]
        assert text[0].isupper() and text.endswith("."), text
        assert "  " not in text and 12 <= len(text.split()) <= 60, text
        assert not re.search(r"\ba [aeiAEI]|\ban [bcdfgjkpqstvwyz]", text), text  # a/an agreement
        which, match = next(
            ((i, m) for i, p in enumerate(patterns) if (m := p.fullmatch(text))), (None, None)
        )
        assert which is not None and match is not None, text
        templates[which] += 1
        words[text.split()[0]] += 1
        person = match["a"].split(maxsplit=1)[1]  # drop the article
        experience = next(e for e in builtin_lists()["experience"] if person.startswith(e + " "))
        occupations[person[len(experience) + 1 :]] += 1
    n_templates = len(builtin_lists()["template"])
    assert len(templates) == n_templates
    assert min(templates.values()) > 20_000 / n_templates / 2  # no template starves
    assert set(occupations) == set(builtin_lists()["occupation"])
    assert max(templates.values()) < 0.25 * 20_000
    assert len(words) >= 4  # sentences open differently ("A", "An", "While", "Currently")


def test_builtin_attributes_cover_the_lists():
    attrs = [builtin_attributes(i) for i in random.Random(0).sample(range(builtin_size()), 20_000)]
    for name, values in builtin_lists().items():
        seen = {a[name] for a in attrs}
        assert len(seen) == len(values), name


def test_builtin_exclusion_skips_used_ids_and_extends_the_same_order():
    first = sample_personas(_builtin(50), seed=3)
    longer = sample_personas(_builtin(100), seed=3)
    assert longer[:50] == first  # a larger n extends a smaller one
    used = {r["persona_id"] for r in first}
    second = sample_personas(_builtin(50), seed=3, exclude_ids=used)
    assert not used & {r["persona_id"] for r in second}
    assert second == longer[50:]


def test_builtin_too_few_after_exclusion(monkeypatch):
    monkeypatch.setattr(personas, "builtin_size", lambda: 30)
    everything = sample_personas(_builtin(30), seed=0)
    assert len({r["persona_id"] for r in everything}) == 30
    used = {r["persona_id"] for r in everything[:25]}
    with pytest.raises(PersonaSourceError) as err:
        sample_personas(_builtin(10), seed=1, exclude_ids=used)
    message = str(err.value)
    assert "asked for 10" in message and "30 distinct" in message and "25 of them excluded" in message
    with pytest.raises(PersonaSourceError, match="asked for 31"):
        sample_personas(_builtin(31), seed=1)


# --- file ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_file_source_by_format(folder, fmt):
    rows = [{"id": i, "persona": p} for i, p in enumerate(PERSONAS)]
    rows += [{"id": 90, "persona": "  "}, {"id": 91, "persona": PERSONAS[0].replace(" ", "   ")}]
    url = f"{folder}/people.{fmt}"
    write_bytes(url, ENCODERS[fmt](rows))
    assert set(read_persona_file(url).values()) == set(PERSONAS)  # blank skipped, spacing variant collapsed
    got = sample_personas(_file(url, 5), seed=1)
    assert len(got) == 5 and len({r["persona_id"] for r in got}) == 5
    assert all(r["persona"] in PERSONAS and r["source"] == f"file:{url}" for r in got)
    assert all(r["persona_id"] == persona_id(r["persona"]) for r in got)
    assert sample_personas(_file(url, 5), seed=1) == got
    assert sample_personas(_file(url, 5), seed=2) != got


def test_file_sample_does_not_depend_on_row_order(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(_jsonl([{"persona": p} for p in PERSONAS]))
    b.write_bytes(_jsonl([{"persona": p} for p in reversed(PERSONAS)]))
    pick = [r["persona_id"] for r in sample_personas(_file(str(a), 6), seed=4)]
    assert pick == [r["persona_id"] for r in sample_personas(_file(str(b), 6), seed=4)]


def test_persona_hub_shaped_file_works_as_is(tmp_path):
    path = tmp_path / "persona.jsonl"
    path.write_text("\n".join(json.dumps({"persona": p}) for p in PERSONAS) + "\n")
    cfg = PersonasConfig.model_validate({"source": "file", "path": str(path), "n": len(PERSONAS)})
    got = sample_personas(cfg, seed=0)
    assert sorted(r["persona"] for r in got) == sorted(PERSONAS)


@pytest.mark.parametrize("name", ["people.jsonl.gz", "people.csv.gz", "people.json"])
def test_compressed_and_json_array_files(folder, name):
    rows = [{"persona": p} for p in PERSONAS]
    if name.endswith(".json"):
        data = json.dumps(rows).encode()
    else:
        data = gzip.compress(_jsonl(rows) if ".jsonl" in name else _csv(rows))
    write_bytes(f"{folder}/{name}", data)
    assert len(sample_personas(_file(f"{folder}/{name}", len(PERSONAS)), seed=0)) == len(PERSONAS)


def test_other_column_name(tmp_path):
    url = str(tmp_path / "p.csv")
    write_bytes(url, _csv([{"description": p} for p in PERSONAS]))
    assert len(sample_personas(_file(url, 3, column="description"), seed=0)) == 3


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_missing_column_names_file_and_columns(folder, fmt):
    url = f"{folder}/people.{fmt}"
    write_bytes(url, ENCODERS[fmt]([{"name": "Ana", "bio": p} for p in PERSONAS]))
    with pytest.raises(PersonaSourceError) as err:
        sample_personas(_file(url, 2), seed=0)
    message = str(err.value)
    assert url in message and "'persona'" in message
    assert "columns found: 'name', 'bio'" in message


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("empty.jsonl", b"", "is empty"),
        ("blank-lines.jsonl", b"\n\n  \n", "is empty"),
        ("empty.csv", b"", "is empty"),
        ("header-only.csv", b"persona\n", "has no personas"),
        ("blanks.jsonl", b'{"persona": ""}\n{"persona": "  "}\n{"persona": null}\n', "has no personas"),
        ("broken.jsonl", b'{"persona": "A cook."}\n{"persona": \n', "line 2 is not JSON"),
        ("list-rows.jsonl", b'["A cook."]\n', "row 1 holds list, not an object"),
        ("string-rows.json", b'["A cook."]', "row 1 holds str, not an object"),
        ("numbers.jsonl", b'{"persona": 7}\n', "row 1 of column 'persona' holds int, not text"),
        ("torn.parquet", b"PAR1 not really", "not readable Parquet"),
        ("torn.jsonl.gz", b"not gzip", "not valid gzip"),
        ("people.txt", b"A cook.\n", "unknown format"),
    ],
)
def test_bad_files_get_clear_errors(tmp_path, name, data, expected):
    url = str(tmp_path / name)
    write_bytes(url, data)
    with pytest.raises(PersonaSourceError, match=re.escape(expected)) as err:
        sample_personas(_file(url, 1), seed=0)
    assert url in str(err.value)


def test_missing_file_is_named(folder):
    url = f"{folder}/nowhere/persona.jsonl"
    with pytest.raises(PersonaSourceError, match=re.escape(f"persona file {url} does not exist")):
        sample_personas(_file(url, 1), seed=0)


def test_file_too_few_after_exclusion(tmp_path):
    url = str(tmp_path / "persona.jsonl")
    write_bytes(url, _jsonl([{"persona": p} for p in PERSONAS]))
    used = {persona_id(p) for p in PERSONAS[:8]} | {"pe-0000000000000000"}  # one id from another source
    got = sample_personas(_file(url, 4), seed=0, exclude_ids=used)
    assert {r["persona"] for r in got} == set(PERSONAS[8:])
    with pytest.raises(PersonaSourceError) as err:
        sample_personas(_file(url, 5), seed=0, exclude_ids=used)
    message = str(err.value)
    assert "asked for 5" in message and f"file:{url} has 12 distinct" in message
    assert "8 of them excluded" in message and "(4 left)" in message
    with pytest.raises(PersonaSourceError, match="asked for 13"):
        sample_personas(_file(url, 13), seed=0)


# --- hf ------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_datasets(monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return tmp_path


def test_hf_source_from_a_local_dataset_folder(offline_datasets):
    folder = offline_datasets / "persona-hub-like"
    folder.mkdir()
    (folder / "persona.jsonl").write_bytes(_jsonl([{"persona": p} for p in PERSONAS]))
    cfg = PersonasConfig(source="hf", dataset=str(folder), n=4)
    got = sample_personas(cfg, seed=0)
    assert len(got) == 4 and all(r["persona"] in PERSONAS for r in got)
    assert {r["source"] for r in got} == {f"hf:{folder}"}
    assert sample_personas(cfg, seed=0) == got

    bad = PersonasConfig(source="hf", dataset=str(folder), n=4, column="text")
    with pytest.raises(PersonaSourceError, match=r"has no column 'text'; columns found: 'persona'"):
        sample_personas(bad, seed=0)


def test_hf_source_that_cannot_load_is_named(offline_datasets):
    cfg = PersonasConfig(source="hf", dataset=str(offline_datasets / "no-such-dataset"), n=1)
    with pytest.raises(PersonaSourceError, match=r"no-such-dataset.*cannot be loaded"):
        sample_personas(cfg, seed=0)


# --- a real S3 endpoint --------------------------------------------------------------------------------


@pytest.mark.tier1
def test_file_source_on_s3(s3_env):
    url = f"{s3_env}/persona-hub/persona.jsonl"
    write_bytes(url, _jsonl([{"persona": p} for p in PERSONAS]))
    got = sample_personas(_file(url, 6), seed=5)
    assert len({r["persona_id"] for r in got}) == 6 and all(r["persona"] in PERSONAS for r in got)
    assert {r["source"] for r in got} == {f"file:{url}"}
    with pytest.raises(
        PersonaSourceError, match=re.escape(f"persona file {s3_env}/missing.jsonl does not exist")
    ):
        sample_personas(_file(f"{s3_env}/missing.jsonl", 1), seed=0)
