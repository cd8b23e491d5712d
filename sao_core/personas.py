"""Personas (SAO.md step 1): sample n distinct personas, one prompt each, from a pluggable source.

    rows = sample_personas(PersonasConfig(source="builtin", n=8), seed=0)
    rows[0]  # {"persona_id": "pe-...", "persona": "A seasoned ...", "source": "builtin"}

Sources:
- `builtin`: a persona space the project generates itself from the attribute lists below (occupation,
  experience, trait, interest, goal, life context, sentence template). A mixed-radix index maps to one
  persona, so sampling never materialises the space; no download, no third-party licence.
- `file`: JSONL, JSON, Parquet or CSV (optionally .gz for the text formats) at any fsspec URL (local,
  s3://, memory://) with a persona column; Persona Hub's persona.jsonl works as it is.
- `hf`: a Hugging Face dataset through `datasets.load_dataset` (needs network, or a local folder).

Every source is sampled the same way: a seeded permutation of its distinct personas, skipping the ids of
personas used by earlier rounds (exclude_ids), first n kept. So a larger n extends a smaller one with the
same seed, and file sampling does not depend on the order of rows in the file.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator
from collections.abc import Set as AbstractSet
from typing import Any

from sao_core.config import PersonasConfig
from sao_core.errors import PersonaSourceError, StorageError
from sao_core.storage import read_bytes

__all__ = [
    "BUILTIN_SIZE",
    "builtin_attributes",
    "builtin_persona",
    "load_persona_pool",
    "normalize_persona",
    "persona_id",
    "read_persona_file",
    "sample_personas",
]


def normalize_persona(text: str) -> str:
    """The persona text with runs of white space (newlines included) folded to one space."""
    return " ".join(text.split())


def persona_id(text: str) -> str:
    """Stable id of a persona: "pe-" + 16 hex digits of the sha256 of its whitespace-normalised text."""
    return "pe-" + hashlib.sha256(normalize_persona(text).encode("utf-8")).hexdigest()[:16]


# --- builtin: the attribute lists -------------------------------------------------------------------
# Written for this project. Every entry fits every template: occupations are bare noun phrases, experience
# and traits are adjectives, interests are noun phrases, goals and life contexts are "-ing" phrases.
# No entry may repeat within its list (a test checks), so each index gives a distinct text.

OCCUPATIONS: tuple[str, ...] = (
    # education
    "primary school teacher",
    "secondary school maths teacher",
    "nursery teacher",
    "special educational needs coordinator",
    "university lecturer",
    "school librarian",
    "music teacher",
    "driving instructor",
    "adult literacy tutor",
    "language tutor",
    "teaching assistant",
    "school bus driver",
    # health and care
    "registered nurse",
    "paramedic",
    "family doctor",
    "hospital pharmacist",
    "community pharmacist",
    "physiotherapist",
    "occupational therapist",
    "dental hygienist",
    "midwife",
    "veterinary surgeon",
    "radiographer",
    "ultrasound technician",
    "speech and language therapist",
    "optometrist",
    "dietitian",
    "care home worker",
    "hospice nurse",
    "medical laboratory scientist",
    "home care assistant",
    "mental health counsellor",
    # software and data
    "software engineer",
    "data analyst",
    "web developer",
    "systems administrator",
    "cybersecurity analyst",
    "database administrator",
    "mobile app developer",
    "machine learning engineer",
    "IT support technician",
    "game developer",
    "software tester",
    "technical writer",
    "user experience designer",
    "product manager",
    # engineering and the built world
    "civil engineer",
    "mechanical engineer",
    "electrical engineer",
    "structural engineer",
    "chemical engineer",
    "environmental engineer",
    "aerospace engineer",
    "land surveyor",
    "architect",
    "urban planner",
    "landscape architect",
    "interior designer",
    "building inspector",
    # trades
    "electrician",
    "plumber",
    "carpenter",
    "welder",
    "car mechanic",
    "bricklayer",
    "roofer",
    "heating engineer",
    "locksmith",
    "painter and decorator",
    "tailor",
    "cabinetmaker",
    "bicycle mechanic",
    "boat builder",
    "piano tuner",
    "stonemason",
    # land and food
    "arable farmer",
    "dairy farmer",
    "market gardener",
    "beekeeper",
    "forester",
    "commercial fisher",
    "vineyard manager",
    "horticulturist",
    "park ranger",
    "head chef",
    "pastry chef",
    "baker",
    "barista",
    "restaurant owner",
    "food truck operator",
    "butcher",
    "craft brewer",
    "cheesemaker",
    "caterer",
    # business and money
    "accountant",
    "bookkeeper",
    "financial adviser",
    "bank cashier",
    "insurance underwriter",
    "tax adviser",
    "internal auditor",
    "actuary",
    "payroll officer",
    "small business owner",
    "independent bookshop owner",
    "estate agent",
    "procurement officer",
    "human resources manager",
    "recruiter",
    "management consultant",
    "marketing coordinator",
    "sales representative",
    "customer service agent",
    "office administrator",
    "executive assistant",
    "logistics coordinator",
    "warehouse supervisor",
    "supply chain analyst",
    "event planner",
    "wedding photographer",
    # law and public service
    "solicitor",
    "paralegal",
    "court interpreter",
    "police officer",
    "firefighter",
    "prison officer",
    "social worker",
    "youth worker",
    "probation officer",
    "community organiser",
    "charity fundraiser",
    "local council officer",
    "customs officer",
    "emergency call handler",
    # media, arts and culture
    "local newspaper journalist",
    "magazine editor",
    "copywriter",
    "literary translator",
    "novelist",
    "poet",
    "podcast producer",
    "radio presenter",
    "film editor",
    "graphic designer",
    "children's book illustrator",
    "animator",
    "museum curator",
    "archivist",
    "public librarian",
    "art conservator",
    "theatre lighting technician",
    "stage actor",
    "session musician",
    "choir director",
    "contemporary dancer",
    "tattoo artist",
    "fashion designer",
    "jewellery maker",
    "studio potter",
    # science and research
    "research chemist",
    "marine biologist",
    "astronomer",
    "geologist",
    "meteorologist",
    "epidemiologist",
    "statistician",
    "economist",
    "historian",
    "archaeologist",
    "anthropologist",
    "linguist",
    "clinical psychologist",
    "laboratory technician",
    "climate scientist",
    "ecologist",
    # transport and travel
    "airline pilot",
    "flight attendant",
    "air traffic controller",
    "train driver",
    "bus driver",
    "long-haul lorry driver",
    "delivery driver",
    "taxi driver",
    "merchant navy officer",
    "travel agent",
    "tour guide",
    "hotel receptionist",
    # sport, personal and animal care
    "personal trainer",
    "yoga instructor",
    "youth football coach",
    "swimming instructor",
    "football referee",
    "hairdresser",
    "beauty therapist",
    "florist",
    "dog groomer",
    "dog trainer",
    "zookeeper",
    "childminder",
    "nanny",
    "funeral director",
    "office cleaner",
    "security guard",
)

EXPERIENCE: tuple[str, ...] = (
    "newly qualified",
    "early-career",
    "mid-career",
    "seasoned",
    "recently promoted",
    "semi-retired",
    "part-time",
    "long-serving",
    "second-career",
    "self-employed",
    "recently hired",
    "experienced",
)

TRAITS: tuple[str, ...] = (
    "methodical and patient",
    "curious and talkative",
    "cautious",
    "pragmatic",
    "meticulous",
    "easy-going",
    "outspoken",
    "quiet but determined",
    "analytical",
    "imaginative",
    "resourceful",
    "sociable",
    "reserved",
    "highly organised",
    "spontaneous",
    "thorough",
    "ambitious",
    "warm-hearted",
    "dry-witted",
    "energetic",
    "calm under pressure",
    "stubborn",
    "open-minded",
    "budget-conscious",
    "competitive",
    "sentimental",
    "practical",
    "idealistic",
    "frugal",
    "generous",
    "tech-savvy",
    "wary of new technology",
    "sceptical",
    "optimistic",
    "anxious about deadlines",
    "cheerful and chatty",
    "shy but curious",
    "blunt but fair",
    "detail-oriented",
    "big-picture",
    "impatient with jargon",
    "eager to learn",
    "self-reliant",
    "community-minded",
    "environmentally conscious",
    "easily bored by routine",
    "gently humorous",
    "conscientious",
    "adventurous",
    "nostalgic",
)

INTERESTS: tuple[str, ...] = (
    "urban beekeeping",
    "the history of map-making",
    "sourdough baking",
    "amateur astronomy",
    "birdwatching",
    "chess openings",
    "long-distance running",
    "vegetable gardening",
    "restoring old furniture",
    "board game design",
    "medieval history",
    "jazz piano",
    "film photography",
    "local folklore",
    "classic cars",
    "sustainable fashion",
    "home brewing",
    "rock climbing",
    "learning Japanese",
    "open-source software",
    "personal finance",
    "ancient Rome",
    "wild swimming",
    "mushroom foraging",
    "knitting",
    "watercolour painting",
    "stand-up comedy",
    "spoken-word poetry",
    "escape rooms",
    "cryptic crosswords",
    "retro video games",
    "model railways",
    "urban sketching",
    "trail running",
    "bicycle touring",
    "sea kayaking",
    "calligraphy",
    "origami",
    "wheel-thrown pottery",
    "woodworking",
    "3D printing",
    "electronics tinkering",
    "amateur radio",
    "family history research",
    "the philosophy of science",
    "behavioural economics",
    "space exploration",
    "marine conservation",
    "rewilding",
    "permaculture",
    "composting",
    "zero-waste living",
    "minimalist living",
    "meditation",
    "salsa dancing",
    "choral singing",
    "opera",
    "West African music",
    "vinyl record collecting",
    "science fiction novels",
    "detective fiction",
    "graphic novels",
    "fantasy worldbuilding",
    "tabletop role-playing games",
    "amateur theatre",
    "documentary films",
    "silent cinema",
    "modernist architecture",
    "industrial heritage",
    "lighthouses",
    "fossil hunting",
    "collecting rocks and minerals",
    "weather forecasting",
    "aquarium keeping",
    "houseplants",
    "bonsai",
    "orchid growing",
    "horse riding",
    "dog agility",
    "cat behaviour",
    "recording birdsong",
    "nature journaling",
    "mathematical puzzles",
    "number theory",
    "the history of cryptography",
    "the history of medicine",
    "food history",
    "regional cuisines",
    "fermentation",
    "tea culture",
    "coffee roasting",
    "wine regions",
    "community gardening",
    "local politics",
    "public transport design",
    "cycling infrastructure",
    "home solar power",
    "electric vehicles",
    "home automation",
    "retro computing",
    "speedcubing",
    "juggling",
    "close-up magic",
    "sign language",
    "the cello",
    "songwriting",
    "mythology",
    "ancient Egypt",
    "the Silk Road",
    "maritime history",
    "railway history",
    "aviation history",
    "ballet",
    "figure skating",
    "tennis statistics",
    "football tactics",
    "cricket",
    "endurance sports nutrition",
    "quilting",
    "embroidery",
    "kite flying",
    "stargazing from dark-sky parks",
)

GOALS: tuple[str, ...] = (
    "preparing for a professional licensing exam",
    "planning a career change",
    "writing a first grant application",
    "organising a community fundraiser",
    "training for a first half marathon",
    "saving for a deposit on a first home",
    "learning to code in the evenings",
    "applying for a promotion",
    "starting a small side business",
    "planning a family holiday on a tight budget",
    "renovating an old kitchen",
    "preparing a talk for a regional conference",
    "writing a memoir",
    "setting up a home office",
    "mentoring a new colleague",
    "building a personal website",
    "learning a language before moving abroad",
    "trying to sleep better",
    "cutting down on screen time",
    "organising a school reunion",
    "applying for a master's programme",
    "planning for retirement",
    "negotiating a pay rise",
    "planning a small wedding",
    "adopting a rescue dog",
    "teaching a teenager to drive",
    "decluttering a crowded house",
    "writing a children's book",
    "launching an email newsletter",
    "studying for a part-time degree",
    "preparing for a job interview",
    "getting better at public speaking",
    "managing a team for the first time",
    "moving to a smaller home",
    "learning to cook healthier meals",
    "getting back into exercise after an injury",
    "planning a vegetable patch",
    "building a household budget spreadsheet",
    "starting a podcast",
    "making sense of a workplace pension",
    "learning to play the guitar",
    "organising a charity bike ride",
    "automating a tedious part of their work",
    "writing clearer reports",
    "digitising years of paper records",
    "preparing to train an apprentice",
    "proposing a change to how their workplace runs",
    "resolving a dispute with a landlord",
    "filing taxes as a freelancer for the first time",
    "choosing a new laptop",
    "planning a three-month sabbatical",
    "learning basic statistics",
    "applying for a small business loan",
    "starting a book club",
    "volunteering as a homework tutor",
    "house-training a new puppy",
    "standing for election to the local council",
    "writing a first novel",
    "translating a family recipe book",
    "setting up a repair café",
    "preparing a portfolio for new clients",
    "planning a cycling trip across the country",
    "studying for a first-aid certificate",
    "organising a neighbourhood clean-up",
    "improving their written English",
    "learning to use spreadsheets properly",
    "researching a family history",
    "building a shed in the garden",
    "redesigning a small business's logo",
    "sorting out a chaotic email inbox",
    "planning meals for a week on a budget",
    "reducing their household's energy bills",
    "writing a speech for a friend's wedding",
    "preparing for a first parent-teacher meeting",
    "choosing a secondary school for their child",
    "applying for a work visa",
    "setting up a small online shop",
    "learning to swim as an adult",
    "running a stall at a weekend market",
    "organising an office move",
    "writing a complaint to their energy supplier",
    "learning about investing for the first time",
    "preparing an exhibition of their own work",
    "coaching a colleague through a difficult project",
    "setting boundaries between work and home",
    "planning a surprise birthday party",
    "revising for an evening-class exam",
    "starting to keep chickens",
    "learning to drive at forty",
    "planning a route for a long-distance walk",
    "writing a cover letter for a dream job",
    "setting up a community WhatsApp group",
    "reorganising a cluttered workshop",
    "building a simple mobile app",
    "preparing for a long-haul flight with toddlers",
    "putting together a training plan for new staff",
    "writing a policy document for a volunteer group",
    "learning first words of sign language",
    "organising a local history walk",
    "starting a running club",
    "comparing broadband deals",
    "planning a memorial for a beloved grandparent",
    "giving feedback to a struggling team member",
    "creating a YouTube channel about their craft",
    "recording a family oral history",
    "buying a first electric car",
    "drafting a business plan",
    "applying for a community arts grant",
    "preparing for a charity quiz night",
    "rebuilding confidence after a redundancy",
    "learning to bake bread at home",
    "writing a short film script",
    "planning a gap year",
    "tidying up their online privacy settings",
    "hosting a dinner for ten on a budget",
    "setting up a mentoring scheme at work",
    "tracking down a rare book",
    "preparing to foster a child",
    "designing a garden for wildlife",
)

CONTEXTS: tuple[str, ...] = (
    "raising two young children",
    "caring for an elderly parent",
    "living in a small rural village",
    "working night shifts",
    "studying part-time",
    "sharing a flat with three friends",
    "commuting long hours by train",
    "living abroad for the first time",
    "recovering from a knee operation",
    "returning to work after parental leave",
    "juggling two part-time jobs",
    "living on a tight budget",
    "settling into a new city",
    "adjusting to an empty nest",
    "managing a long-term health condition",
    "volunteering at weekends",
    "coaching a youth team on Saturdays",
    "renting a draughty old house",
    "living on a narrowboat",
    "splitting time between two cities",
    "working remotely from a spare bedroom",
    "expecting a first baby",
    "moving house",
    "helping run the family business",
    "looking after a large garden",
    "raising teenagers",
    "parenting solo",
    "living with three generations under one roof",
    "balancing work with evening classes",
    "training a lively young dog",
    "working a four-day week",
    "living in a high-rise flat",
    "living near the coast",
    "living in a mountain town",
    "spending summers on a family farm",
    "sharing one car with a partner",
    "commuting by bicycle",
    "caring for a partner with a disability",
    "learning to live with hearing loss",
    "living alone for the first time",
    "supporting a sibling through university",
    "running a household of five on one income",
    "working seasonal contracts",
    "serving as a school governor",
    "looking after a neighbour's allotment",
    "preparing to emigrate",
    "working between two languages every day",
    "taking an online course after work",
)

# How each template joins the parts: a = "a/an experience occupation", t = trait, i = interest, g = goal,
# c = life context. Different shapes keep the personas from all reading alike.
TEMPLATES: tuple[str, ...] = (
    "{a} who is {t}, currently {g} while {c}, with a long-standing interest in {i}.",
    "{a}, {t} and fascinated by {i}, who is {g} while {c}.",
    "While {c}, {a} who is {t} is {g} and reads everything about {i}.",
    "{a} with a passion for {i}: {t}, {c}, and in the middle of {g}.",
    "Currently {g}, {a} who is {t}, {c}, and always keen to talk about {i}.",
    "{a} ({t}) who is {c} and {g}, and who spends spare time on {i}.",
    "{a} who is {g}; {t}, {c}, and quietly obsessed with {i}.",
    "{a} known for being {t}, who is {c} while {g} and who enjoys {i} at weekends.",
)

# The least significant digit comes first: index -> template, occupation, experience, trait, ...
_RADICES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("template", TEMPLATES),
    ("occupation", OCCUPATIONS),
    ("experience", EXPERIENCE),
    ("trait", TRAITS),
    ("interest", INTERESTS),
    ("goal", GOALS),
    ("context", CONTEXTS),
)


def _space_size() -> int:
    size = 1
    for _, values in _RADICES:
        size *= len(values)
    return size


BUILTIN_SIZE: int = _space_size()

# "an" goes by sound, not by letter: a university lecturer, an MRI technician, an hour.
_AN_PREFIXES = ("hour", "honest", "honour", "heir")
_A_PREFIXES = ("uni", "use", "usu", "eu", "one", "once", "ewe")


def _article(phrase: str) -> str:
    word = phrase.split(maxsplit=1)[0]
    lower = word.lower()
    if lower.startswith(_AN_PREFIXES):
        return "an"
    if lower.startswith(_A_PREFIXES):
        return "a"
    # Initialisms read letter by letter: an MRI, an X-ray, an IT, but a UX.
    head = word.split("-", 1)[0]
    if head.isupper() and len(head) <= 4:
        return "an" if head[0] in "AEFHILMNORSX" else "a"
    return "an" if lower[0] in "aeiou" else "a"


def builtin_attributes(index: int) -> dict[str, str]:
    """The attributes (template, occupation, experience, trait, interest, goal, context) of a builtin index."""
    if not 0 <= index < BUILTIN_SIZE:
        raise IndexError(f"builtin persona index {index} is outside 0..{BUILTIN_SIZE - 1}")
    parts: dict[str, str] = {}
    rest = index
    for name, values in _RADICES:
        rest, digit = divmod(rest, len(values))
        parts[name] = values[digit]
    return parts


def builtin_persona(index: int) -> str:
    """The builtin persona at `index` (0 <= index < BUILTIN_SIZE); each index gives a distinct text."""
    p = builtin_attributes(index)
    person = f"{p['experience']} {p['occupation']}"
    text = p["template"].format(
        a=f"{_article(person)} {person}", t=p["trait"], i=p["interest"], g=p["goal"], c=p["context"]
    )
    return text[0].upper() + text[1:]


def _builtin_order(seed: int, size: int) -> Iterator[int]:
    """Distinct indices of range(size) in a seeded random order, drawn lazily."""
    rng = random.Random(seed)
    if size <= 1 << 20:
        yield from rng.sample(range(size), size)
        return
    seen: set[int] = set()
    while len(seen) < size:  # rejection sampling: the space is far larger than any n asked for
        index = rng.randrange(size)
        if index not in seen:
            seen.add(index)
            yield index


# --- file and hf: a pool of distinct personas ----------------------------------------------------------

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _file_format(url: str) -> tuple[str, bool]:
    name = url.rstrip("/").rsplit("/", 1)[-1].lower()
    compressed = name.endswith(".gz")
    if compressed:
        name = name[: -len(".gz")]
    for ext, fmt in _FORMATS.items():
        if name.endswith(ext):
            if compressed and fmt == "parquet":
                break  # parquet compresses its own pages
            return fmt, compressed
    raise PersonaSourceError(
        f"persona file {url}: unknown format; allowed: .jsonl, .json, .parquet, .csv (.jsonl.gz, .json.gz, .csv.gz)"
    )


def _missing_column(url: str, column: str, found: Iterable[str]) -> PersonaSourceError:
    names = ", ".join(repr(c) for c in found) or "none"
    return PersonaSourceError(
        f"persona file {url} has no column {column!r}; columns found: {names} (set personas.column)"
    )


def _jsonl_values(text: str, url: str, column: str, json_array_ok: bool) -> list[Any]:
    # A .json file may hold one array of objects; otherwise (and for .jsonl) one object per line.
    if json_array_ok and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise PersonaSourceError(f"persona file {url} is not valid JSON: {e}") from e
        numbered = list(enumerate(rows, 1))
    else:
        numbered = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                numbered.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise PersonaSourceError(f"persona file {url}: line {lineno} is not JSON ({e})") from e
    if not numbered:
        raise PersonaSourceError(f"persona file {url} is empty: it has no rows")
    found: dict[str, None] = {}
    values = []
    for lineno, row in numbered:
        if not isinstance(row, dict):
            raise PersonaSourceError(
                f"persona file {url}: row {lineno} holds {type(row).__name__}, not an object with a {column!r} field"
            )
        found.update(dict.fromkeys(row))
        values.append(row.get(column))
    if column not in found:
        raise _missing_column(url, column, found)
    return values


def _csv_values(text: str, url: str, column: str) -> list[Any]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise PersonaSourceError(f"persona file {url} is empty: it has no header row")
    if column not in reader.fieldnames:
        raise _missing_column(url, column, reader.fieldnames)
    try:
        return [row.get(column) for row in reader]
    except csv.Error as e:
        raise PersonaSourceError(f"persona file {url} is not valid CSV: {e}") from e


def _parquet_values(data: bytes, url: str, column: str) -> list[Any]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(io.BytesIO(data))
        names = pf.schema_arrow.names
        if column not in names:
            raise _missing_column(url, column, names)
        return list(pf.read(columns=[column]).column(column).to_pylist())
    except PersonaSourceError:
        raise
    except Exception as e:  # a torn or foreign file must name itself
        raise PersonaSourceError(
            f"persona file {url} is not readable Parquet: {type(e).__name__}: {e}"
        ) from e


def _pool(values: Iterable[Any], where: str, column: str) -> dict[str, str]:
    """Distinct personas by id, first text kept; empty and missing values skipped."""
    pool: dict[str, str] = {}
    for row, value in enumerate(values, 1):
        if value is None:
            continue
        if not isinstance(value, str):
            raise PersonaSourceError(
                f"persona source {where}: row {row} of column {column!r} holds {type(value).__name__}, not text"
            )
        text = normalize_persona(value)
        if text:
            pool.setdefault(persona_id(text), text)
    return pool


def read_persona_file(url: str, column: str = "persona") -> dict[str, str]:
    """Distinct personas (persona_id -> text) of a JSONL/JSON/Parquet/CSV file at any fsspec URL."""
    fmt, compressed = _file_format(url)
    try:
        data = read_bytes(url)
    except FileNotFoundError as e:
        raise PersonaSourceError(f"persona file {url} does not exist") from e
    except StorageError as e:
        raise PersonaSourceError(f"persona file {url} cannot be read: {e}") from e
    except Exception as e:  # credentials, endpoint, permissions: name the file, keep the cause
        raise PersonaSourceError(f"persona file {url} cannot be read: {type(e).__name__}: {e}") from e
    if compressed:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise PersonaSourceError(f"persona file {url} is not valid gzip: {e}") from e
    if fmt == "parquet":
        values = _parquet_values(data, url, column)
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise PersonaSourceError(f"persona file {url} is not UTF-8 text: {e}") from e
        if fmt == "csv":
            values = _csv_values(text, url, column)
        else:
            values = _jsonl_values(text, url, column, json_array_ok=fmt == "json")
    pool = _pool(values, url, column)
    if not pool:
        raise PersonaSourceError(
            f"persona file {url} has no personas: column {column!r} is empty in all {len(values)} rows"
        )
    return pool


def _read_hf(cfg: PersonasConfig, where: str) -> dict[str, str]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split)
    except Exception as e:  # offline, unknown id, missing subset or split
        raise PersonaSourceError(
            f"persona source {where} (subset {cfg.subset!r}, split {cfg.split!r}) cannot be loaded: "
            f"{type(e).__name__}: {e}"
        ) from e
    if cfg.column not in ds.column_names:
        names = ", ".join(repr(c) for c in ds.column_names) or "none"
        raise PersonaSourceError(
            f"persona source {where} has no column {cfg.column!r}; columns found: {names} (set personas.column)"
        )
    values = ds.select_columns([cfg.column]).to_dict()[cfg.column]
    pool = _pool(values, where, cfg.column)
    if not pool:
        raise PersonaSourceError(
            f"persona source {where} has no personas: column {cfg.column!r} is empty in all {len(values)} rows"
        )
    return pool


def _source_name(cfg: PersonasConfig) -> str:
    if cfg.source == "file":
        return f"file:{cfg.path}"
    if cfg.source == "hf":
        return f"hf:{cfg.dataset}" + (f":{cfg.subset}" if cfg.subset else "")
    return "builtin"


def load_persona_pool(cfg: PersonasConfig) -> dict[str, str]:
    """All distinct personas (persona_id -> text) of a file or hf source; builtin is never materialised."""
    where = _source_name(cfg)
    if cfg.source == "file":
        assert cfg.path is not None  # PersonasConfig refuses a file source without a path
        return read_persona_file(cfg.path, cfg.column)
    if cfg.source == "hf":
        return _read_hf(cfg, where)
    raise PersonaSourceError(f"persona source {where} has {BUILTIN_SIZE} personas; sample it, do not load it")


# --- sampling ----------------------------------------------------------------------------------------


def _too_few(n: int, where: str, size: int, excluded: int) -> PersonaSourceError:
    return PersonaSourceError(
        f"asked for {n} personas but {where} has {size} distinct personas, {excluded} of them excluded "
        f"as used by earlier rounds ({size - excluded} left); lower personas.n or use a larger source"
    )


def _take(
    order: Iterable[tuple[str, str]], n: int, exclude_ids: AbstractSet[str], where: str
) -> tuple[list[dict[str, str]], int, int]:
    """The first n personas of `order` not excluded, plus how many were seen and how many excluded."""
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    excluded = 0
    for pid, text in order:
        if pid in seen:
            continue
        seen.add(pid)
        if pid in exclude_ids:
            excluded += 1
            continue
        rows.append({"persona_id": pid, "persona": text, "source": where})
        if len(rows) == n:
            break
    return rows, len(seen), excluded


def _builtin_texts(seed: int, size: int) -> Iterator[tuple[str, str]]:
    for index in _builtin_order(seed, size):
        text = builtin_persona(index)
        yield persona_id(text), text


def sample_personas(
    cfg: PersonasConfig, seed: int, exclude_ids: AbstractSet[str] = frozenset()
) -> list[dict[str, str]]:
    """n distinct personas {persona_id, persona, source}, deterministic for (cfg, seed), none in exclude_ids.

    Raises PersonaSourceError when the source is unreadable, has no personas, or has fewer than n left
    after exclusion (the message gives how many were asked, how many the source has, how many excluded).
    """
    where = _source_name(cfg)
    n = cfg.n
    if cfg.source == "builtin":
        size = BUILTIN_SIZE
        if n > size:
            raise _too_few(n, where, size, 0)
        rows, seen, excluded = _take(_builtin_texts(seed, size), n, exclude_ids, where)
        if len(rows) < n:  # only after the whole space was drawn
            raise _too_few(n, where, seen, excluded)
        return rows
    pool = load_persona_pool(cfg)
    # Sorting by id first makes the sample independent of row order in the file.
    ids = sorted(pool)
    random.Random(seed).shuffle(ids)
    rows, _, _ = _take(((pid, pool[pid]) for pid in ids), n, exclude_ids, where)
    if len(rows) < n:
        raise _too_few(n, where, len(pool), sum(1 for pid in pool if pid in exclude_ids))
    return rows
