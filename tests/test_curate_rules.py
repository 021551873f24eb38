"""The curation rules on crafted documents: each rule fires on what it targets and not on clean prose."""

import random

import pytest

from llmexp.plugins.curate.rules.language import (
    LanguageSettings,
    identify,
    kept_language,
    language_problems,
)
from llmexp.plugins.curate.rules.minhash import (
    FuzzySettings,
    band_keys,
    connected_components_survivors,
    duplicate_pairs,
    estimated_jaccard,
    fuzzy_problems,
    lsh_probability,
    shingles,
    signature,
)
from llmexp.plugins.curate.rules.normalisation import (
    Normalisation,
    exact_key,
    normalisation_problems,
    normalise,
)
from llmexp.plugins.curate.rules.pii import PiiSettings, pii_problems, redact
from llmexp.plugins.curate.rules.quality import (
    QualitySettings,
    quality_failures,
    quality_problems,
    quality_rule_names,
)

PROSE = (
    "The river runs through the old town and past the mill that was built by the first settlers. "
    "In the spring the water is high, and the children of the town like to watch the boats go by. "
    "Most of the houses along the bank have small gardens with roses and apple trees. "
    "The mill is a museum now, and visitors learn how flour was made with the power of the water. "
    "On Sundays a market is held in the square, where farmers sell bread, cheese and honey. "
    "Many people who grew up here return each summer to walk along the river with their families."
)


# normalisation


def test_normalise_folds_case_unicode_punctuation_and_spacing():
    assert normalise("  Ｈｅｌｌｏ,\tWORLD!\n\nÉté  ", Normalisation()) == "hello world été"
    assert normalise("Hello, World", Normalisation(lowercase=False)) == "Hello World"
    assert normalise("Hello,  World", Normalisation(strip_punctuation=False, collapse_whitespace=False)) == "hello,  world"
    assert normalise("Room 101", Normalisation(strip_digits=True)) == "room"
    assert normalise("ﬁne", Normalisation(unicode_form="none", lowercase=False)) == "ﬁne"
    assert normalise("ﬁne", Normalisation(lowercase=False)) == "fine"


def test_exact_keys_equal_after_normalisation_only():
    how = Normalisation()
    key = exact_key("The cat sat on the mat.", how)
    assert len(key) == 16
    assert exact_key("the  CAT sat on the mat", how) == key
    assert exact_key("The cat sat on the hat.", how) != key
    assert exact_key("the  CAT sat on the mat", Normalisation(lowercase=False)) != exact_key("The cat sat on the mat.", Normalisation(lowercase=False))


def test_normalisation_problem_names_the_field():
    assert normalisation_problems(Normalisation(), "technique.normalisation") == []
    [problem] = normalisation_problems(Normalisation(unicode_form="NFX"), "technique.normalisation")
    assert "technique.normalisation.unicode_form='NFX'" in problem and "NFKC" in problem


# MinHash + LSH


def _edited(words: list[str], edits: int, rng: random.Random) -> list[str]:
    out = list(words)
    for position in rng.sample(range(len(out)), edits):
        out[position] = f"x{rng.randrange(10**9)}"
    return out


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_minhash_estimates_true_jaccard():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    s = FuzzySettings(num_perm=256, bands=32, rows=8)
    errors = []
    for edits in (0, 2, 5, 10, 20, 40):
        base = [rng.choice(vocab) for _ in range(300)]
        a, b = " ".join(base), " ".join(_edited(base, edits, rng))
        true = _jaccard(shingles(a, s), shingles(b, s))
        estimate = estimated_jaccard(signature(a, s), signature(b, s))
        errors.append(abs(estimate - true))
        if edits == 0:
            assert estimate == true == 1.0
    # standard error of a 256-permutation estimate is at most 0.031
    assert max(errors) < 0.1, errors


def test_band_keys_meet_only_for_near_duplicates():
    rng = random.Random(1)
    s = FuzzySettings()
    words = [f"w{rng.randrange(5000)}" for _ in range(400)]
    near = " ".join(_edited(words, 1, rng))
    unrelated = " ".join(f"w{rng.randrange(5000)}" for _ in range(400))
    keys = band_keys(signature(" ".join(words), s), s)
    assert len(keys) == 14 and all(len(k) == 16 for k in keys)
    assert len(set(keys)) == 14  # bands never share a key
    assert set(keys) & set(band_keys(signature(near, s), s))
    assert not set(keys) & set(band_keys(signature(unrelated, s), s))
    assert lsh_probability(0.9, s) > 0.98 and lsh_probability(0.5, s) < 0.06


def test_char_shingles():
    s = FuzzySettings(shingle="char", ngram=4)
    assert shingles("Abc, de!", s) == {b"abc ", b"bc d", b"c de"}
    assert shingles("ab", FuzzySettings(shingle="char")) == {b"ab"}


def test_survivors_deterministic_under_pair_order():
    buckets = [[7, 3], [3, 9, 12], [1, 4], [20], [4, 2], [15, 16]]
    pairs = list(duplicate_pairs(buckets))
    expected = {7, 9, 12, 2, 4, 16}  # components {3,7,9,12} {1,2,4} {15,16}: the smallest survives
    rng = random.Random(2)
    for _ in range(20):
        shuffled = [(j, i) if rng.random() < 0.5 else (i, j) for i, j in rng.sample(pairs, len(pairs))]
        assert connected_components_survivors(25, shuffled) == expected
    assert connected_components_survivors([1, 2, 4], [(4, 2), (2, 1)]) == {2, 4}
    with pytest.raises(ValueError, match=r"\(3, 30\)"):
        connected_components_survivors(10, [(3, 30)])


def test_fuzzy_problems_name_the_field():
    assert fuzzy_problems(FuzzySettings(), "technique.fuzzy_dedup") == []
    [problem] = fuzzy_problems(FuzzySettings(num_perm=128), "technique.fuzzy_dedup")
    assert "technique.fuzzy_dedup.num_perm=128" in problem and "num_perm=112" in problem
    problems = fuzzy_problems(FuzzySettings(shingle="token", ngram=0, threshold=1.5), "f")
    assert [p.split("=")[0] for p in problems] == ["f.shingle", "f.ngram", "f.threshold"]


# quality


def test_clean_prose_passes_every_rule():
    assert quality_failures(PROSE, QualitySettings()) == []


CRAFTED = {
    "gopher_word_count": "The cat sat on the mat with the dog.",
    "gopher_mean_word_length": " ".join(["the of a is to be and it at on"] * 8) + ".",
    "gopher_symbol_word_ratio": PROSE + " " + "#tag " * 20,
    "gopher_bullet_lines": "\n".join(f"- item {i} of the list and more words to say." for i in range(60)),
    "gopher_ellipsis_lines": PROSE + "\n" + "\n".join(f"read more about topic {i}..." for i in range(6)),
    "gopher_alpha_words": PROSE + " " + " ".join(str(i) for i in range(100, 160)),
    "gopher_stop_words": " ".join(["apples bananas cherries dates figs grapes"] * 10) + ".",
    "gopher_duplicate_lines": PROSE + "\n" + "\n".join(["Click here."] * 5),
    "gopher_duplicate_line_chars": PROSE + "\n" + "\n".join(["Subscribe to the newsletter for weekly updates on all of our news."] * 5),
    "gopher_duplicate_paragraphs": PROSE + "\n\n" + "\n\n".join(["Share this."] * 3),
    "gopher_duplicate_paragraph_chars": PROSE + "\n\n" + "\n\n".join(
        ["Subscribe to the newsletter for weekly updates on all of our news and offers."] * 5
    ),
    "gopher_top_2gram": PROSE + " " + "buy now " * 60,
    "gopher_duplicate_5gram": PROSE + " " + PROSE.split(". ")[0] + ". " + PROSE.split(". ")[0] + ".",
    "c4_lorem_ipsum": PROSE + " Lorem ipsum dolor sit amet.",
    "c4_curly_bracket": PROSE + " function f() { return 1; }",
    "c4_too_few_sentences": "\n".join(
        ["Home about contact shop blog news events gallery team careers press links sitemap"] * 6
    ),
}


@pytest.mark.parametrize("rule", sorted(CRAFTED))
def test_each_quality_rule_fires_on_its_crafted_text(rule):
    failures = quality_failures(CRAFTED[rule], QualitySettings())
    assert rule in failures, failures
    assert rule not in quality_failures(CRAFTED[rule], QualitySettings(disabled=[rule]))


def test_hashes_and_ellipses_are_counted_apart():
    some_of_each = PROSE + " #a #b #c #d #e #f #g #h" + " so on..." * 8  # 129 words: 0.06 each, 0.12 together
    assert "gopher_symbol_word_ratio" not in quality_failures(some_of_each, QualitySettings())
    assert "gopher_symbol_word_ratio" in quality_failures(some_of_each, QualitySettings(max_symbol_word_ratio=0.05))


def test_c4_line_rules_decide_the_sentence_count():
    lines = [f"Our privacy policy changed on day {i}. Read it now. Then agree." for i in range(3)]
    page = "\n".join([*lines, "We like javascript a lot. It runs here. Yes."])
    assert "c4_too_few_sentences" in quality_failures(page, QualitySettings())
    enough = QualitySettings(disabled=["c4_policy_lines", "c4_javascript_lines"])
    assert "c4_too_few_sentences" not in quality_failures(page, enough)
    assert quality_failures(PROSE.replace(". ", ".\n"), QualitySettings()) == []


def test_failures_follow_the_fixed_rule_order():
    names = quality_rule_names(QualitySettings())
    assert names[0] == "gopher_word_count" and names[-1] == "c4_too_few_sentences"
    assert "gopher_top_4gram" in names and "gopher_duplicate_10gram" in names
    failures = quality_failures("lorem ipsum {", QualitySettings())
    assert failures == sorted(failures, key=names.index)
    assert failures[0] == "gopher_word_count" and "c4_lorem_ipsum" in failures


def test_quality_problems_name_the_field():
    assert quality_problems(QualitySettings(), "q") == []
    problems = quality_problems(QualitySettings(disabled=["gopher_nonsense"], max_bullet_lines=1.5, min_words=10**6), "q")
    assert "q.disabled names 'gopher_nonsense'" in problems[0]
    assert problems[1].startswith("q.max_bullet_lines=1.5")
    assert problems[2].startswith("q.min_words=1000000")


# PII


@pytest.mark.parametrize(
    ("text", "redacted", "kind"),
    [
        ("Write to jane.doe+news@mail.example.co.uk today.", "Write to <EMAIL> today.", "email"),
        ("Call +44 20 7946 0958 now.", "Call <PHONE> now.", "phone"),
        ("Call (415) 555-0132 or 415-555-0199.", "Call <PHONE> or <PHONE>.", "phone"),
        ("Server 192.168.1.20 is down.", "Server <IP_ADDRESS> is down.", "ip_address"),
        ("Route via 2001:db8::8a2e:370:7334 first.", "Route via <IP_ADDRESS> first.", "ip_address"),
        ("Card 4111 1111 1111 1111 was charged.", "Card <CREDIT_CARD> was charged.", "credit_card"),
        ("Card 5500-0000-0000-0004 was charged.", "Card <CREDIT_CARD> was charged.", "credit_card"),
        ("Pay to GB82 WEST 1234 5698 7654 32 please.", "Pay to <IBAN> please.", "iban"),
        ("Clone https://bob:s3cret@git.example.com/r.git", "Clone https://<URL_CREDENTIALS>@git.example.com/r.git", "url_credentials"),
    ],
)
def test_each_pii_kind_is_redacted_and_counted(text, redacted, kind):
    out, counts = redact(text, PiiSettings())
    assert out == redacted
    assert dict(counts) == {kind: redacted.count(f"<{kind.upper()}>")}


@pytest.mark.parametrize(
    "text",
    [
        "Card 4111 1111 1111 1112 failed the checksum.",  # Luhn-invalid
        "Account GB00 WEST 1234 5698 7654 32 is malformed.",  # mod-97-invalid
        "Version 1.2.300.4 and 999.1.1.1 are not addresses.",
        "The meeting is at 12:30:45 on 2024-01-15, room 101, in 1999.",
        "In Haskell, f :: Int -> Int and the MAC is 00:1A:2B:3C:4D:5E.",
    ],
)
def test_invalid_numbers_are_left_alone(text):
    assert redact(text, PiiSettings()) == (text, {})


def test_only_chosen_kinds_are_redacted():
    text = "Mail a@b.org or call +1 415 555 0132."
    out, counts = redact(text, PiiSettings(kinds=["email"]))
    assert out == "Mail <EMAIL> or call +1 415 555 0132." and counts == {"email": 1}
    [problem] = pii_problems(PiiSettings(kinds=["email", "ssn"]), "technique.pii")
    assert "technique.pii.kinds names 'ssn'" in problem and "credit_card" in problem


# language


def test_english_kept_german_and_french_detected():
    s = LanguageSettings()
    assert identify(PROSE)[0] == "en" and kept_language(PROSE, s)
    german = "Der Fluss fließt durch die alte Stadt und an der Mühle vorbei, die von den ersten Siedlern gebaut wurde."
    french = "La rivière traverse la vieille ville et passe devant le moulin construit par les premiers habitants."
    assert identify(german)[0] == "de" and identify(french)[0] == "fr"
    assert not kept_language(german, s) and not kept_language(french, s)
    assert kept_language(german, LanguageSettings(keep=["en", "de"]))
    assert identify(german.replace(", ", ",\n"))[0] == "de"
    assert not kept_language(PROSE, LanguageSettings(min_score=1.01))


def test_language_problems_name_the_field():
    assert language_problems(LanguageSettings(keep=["en", "de"]), "technique.language") == []
    problems = language_problems(LanguageSettings(keep=["english"], min_score=2.0), "technique.language")
    assert "technique.language.keep names 'english'" in problems[0]
    assert problems[1].startswith("technique.language.min_score=2.0")
