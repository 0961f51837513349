"""Final-answer extraction: every mode on correct, missing and malformed texts."""

from __future__ import annotations

import pytest

from ensemble_serve.shared.voting.answers import (
    MAX_TEXT_CHARS,
    MODES,
    Extraction,
    answers_equal,
    canonical_number,
    extract_answer,
    get_extractor,
    normalize_answer,
)

# --- marked -----------------------------------------------------------------


def test_marked_takes_last_marker_line():
    text = "3+4=7\n#### 6\nno wait\n#### 7\n"
    assert extract_answer(text, "marked") == Extraction("7", "ok", "7")


def test_marked_normalizes_numbers_and_keeps_text():
    assert extract_answer("x\n####  1,234.50 ", "marked").value == "1234.5"
    assert extract_answer("x\n#### 4 17 52 83", "marked").value == "4 17 52 83"


def test_marked_missing_and_malformed():
    assert extract_answer("the answer is 12", "marked") == Extraction(None, "missing", None)
    assert extract_answer("mid-line #### 12", "marked").status == "missing"
    assert extract_answer("x\n####   \n", "marked").status == "malformed"
    assert extract_answer("x\n####", "marked").status == "malformed"
    assert extract_answer("", "marked").status == "missing"


def test_marked_ignores_longer_hash_runs():
    assert extract_answer("##### Heading\n", "marked").status == "missing"


def test_marked_crlf():
    assert extract_answer("a\r\n#### 42\r\n", "marked").value == "42"


# --- boxed ------------------------------------------------------------------


def test_boxed_last_with_nested_braces():
    text = r"first \boxed{1} then \boxed{\frac{1}{2}}"
    assert extract_answer(text, "boxed") == Extraction(r"\frac{1}{2}", "ok", r"\frac{1}{2}")


def test_boxed_number_normalized():
    assert extract_answer(r"so \boxed{ 042 }.", "boxed").value == "42"


def test_boxed_missing_and_malformed():
    assert extract_answer("no box here 5", "boxed").status == "missing"
    unbalanced = extract_answer(r"\boxed{\frac{1}{2}", "boxed")
    assert unbalanced.status == "malformed" and unbalanced.value is None
    assert unbalanced.raw.startswith(r"\boxed{")
    assert extract_answer(r"\boxed{  }", "boxed").status == "malformed"


# --- number -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("42", "42"),
        ("+42", "42"),
        ("-42", "-42"),
        ("007", "7"),
        ("0", "0"),
        ("-0", "0"),
        ("-0.000", "0"),
        ("3.0", "3"),
        ("2.50", "2.5"),
        ("0.50", "0.5"),
        (".5", "0.5"),
        ("5.", "5"),
        ("1,234", "1234"),
        ("12,345,678.90", "12345678.9"),
        ("-1,000", "-1000"),
        ("1,23", None),
        ("1234,567", None),
        ("12,3456", None),
        ("1e5", None),
        ("abc", None),
        ("", None),
        ("--5", None),
    ],
)
def test_canonical_number_table(raw, canonical):
    assert canonical_number(raw) == canonical


def test_number_prefers_marker_content():
    assert extract_answer("7 apples and 9 pears\n#### +1,000", "number") == Extraction("1000", "ok", "+1,000")
    assert extract_answer(r"2 and \boxed{3.50}", "number").value == "3.5"


def test_number_falls_back_to_last_number():
    assert extract_answer("x = 3 then 12.50 and finally 7.", "number").value == "7"
    assert extract_answer("the result is -15", "number").value == "-15"
    assert extract_answer("35-6=29", "number").value == "29"
    assert extract_answer("8-5", "number").value == "5"  # a binary minus is not a sign
    assert extract_answer("total 1,234,567 units", "number").value == "1234567"


def test_number_missing_and_malformed():
    assert extract_answer("no digits at all", "number").status == "missing"
    assert extract_answer("v2 and x3", "number").status == "missing"  # digits glued to words
    bad = extract_answer("I computed 12\n#### twelve", "number")
    assert bad == Extraction(None, "malformed", "twelve")
    assert extract_answer("12\n#### ", "number").status == "malformed"
    assert extract_answer(r"\boxed{x+1}", "number").status == "malformed"


# --- choice -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("reasoning\n#### C", "C"),
        ("reasoning\n#### (d)", "D"),
        (r"\boxed{b}", "B"),
        ("So the answer is (B).", "B"),
        ("The answer is b.", "B"),
        ("Answer: E", "E"),
        ("answer: a", "A"),
        ("The answer is C because it fits.", "C"),
        ("I pick the last option (e)", "E"),
        ("Options (A) and (B) compared.\nFinal: (A)", "A"),
    ],
)
def test_choice_found(text, letter):
    result = extract_answer(text, "choice")
    assert result.status == "ok" and result.value == letter


@pytest.mark.parametrize(
    "text",
    ["The answer is a bit tricky", "no letter here", "(B) is wrong, as shown here", "Answer: F", ""],
)
def test_choice_missing(text):
    assert extract_answer(text, "choice").status == "missing"


def test_choice_malformed_marker():
    assert extract_answer("x\n#### banana", "choice") == Extraction(None, "malformed", "banana")
    assert extract_answer("x\n#### F", "choice").status == "malformed"


# --- text -------------------------------------------------------------------


def test_text_marker_and_answer_is():
    assert extract_answer("blah\n####   Paris,   France.  ", "text").value == "Paris, France"
    assert extract_answer("I think.\nThe answer is   New York.\n", "text") == Extraction("New York", "ok", "New York.")
    assert extract_answer("Answer:  1,234 ", "text").value == "1,234"  # text mode keeps the text


def test_text_whole_text_and_case_kept():
    assert extract_answer("  The  Eiffel\n Tower. ", "text").value == "The Eiffel Tower"


def test_text_missing_and_malformed():
    assert extract_answer("   \n ", "text").status == "missing"
    assert extract_answer(".", "text").status == "missing"
    assert extract_answer("words\n#### ", "text").status == "malformed"


# --- regex ------------------------------------------------------------------


def test_regex_group_and_whole_match():
    text = "ANS=3 ... ANS=0042"
    assert extract_answer(text, {"regex": r"ANS=(\d+)"}) == Extraction("42", "ok", "0042")
    assert extract_answer(text, {"regex": r"ANS=\d+"}).value == "ANS=0042"


def test_regex_missing_and_empty_group():
    assert extract_answer("nothing", {"regex": r"ANS=(\d+)"}).status == "missing"
    assert extract_answer("ANS=", {"regex": r"ANS=(\d*)"}).status == "malformed"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"regex": "(unclosed"}, "invalid answer regex"),
        ({"regex": ""}, "non-empty string"),
        ({"regex": 5}, "non-empty string"),
        ({"pattern": "x"}, "exactly the key 'regex'"),
        ({"regex": "x", "flags": "i"}, "exactly the key 'regex'"),
        ("bogus", "unknown answer mode 'bogus'"),
        (3, "mode name or a dict"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        get_extractor(spec)


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError) as info:
        extract_answer("x", "numbr")
    for mode in MODES:
        assert mode in str(info.value)


def test_registry_and_text_type():
    assert set(MODES) == {"auto", "marked", "boxed", "number", "choice", "text", "natural"}
    assert get_extractor("marked")("#### 5").value == "5"
    with pytest.raises(TypeError):
        extract_answer(None)  # type: ignore[arg-type]


# --- auto -------------------------------------------------------------------


def test_auto_order_and_normalization():
    assert extract_answer(r"\boxed{9}" + "\n#### 1,000") == Extraction("1000", "ok", "1,000")
    assert extract_answer(r"the answer is 3, so \boxed{4}").value == "4"
    assert extract_answer("so the answer is 2.50.").value == "2.5"
    assert extract_answer("The answer is:  Mount  Everest.").value == "Mount Everest"


def test_auto_missing_and_malformed():
    assert extract_answer("3+4=7,7*5=35") == Extraction(None, "missing", None)  # stray numbers do not count
    assert extract_answer("").status == "missing"
    assert extract_answer("work\n#### ").status == "malformed"
    assert extract_answer(r"\boxed{12").status == "malformed"


# --- natural --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ("#### 843", "843"),  # the sandbox's marked answers, read as `auto` reads them
        ("work\n#### 1,000", "1000"),
        (r"so \boxed{4}", "4"),
        ("The answer is 42 apples.", "42"),  # a number inside the stated answer
        ("The answer is: Mount Everest.", "Mount Everest"),
        ("The answer is (B).", "B"),
        ("The answer is 4, 17, 52.", "4 17 52"),
        ("17 + 25 = 32.", "32"),  # natural replies: the last number of the last two sentences
        ("So the total is 1,204 apples.", "1204"),
        ("12 + 7 = 9", "9"),
        ("To find the total, add 17 and 25. 17 + 25 = 42. I hope this helps!", "42"),
        ("Step 1: 3 x 4 = 12\nStep 2: 12 + 5 = 17\nSo she has 17 apples.", "17"),
        ("The sorted list is 4, 17, 52 and 83.", "4 17 52 83"),
        ("4 17 52 83", "4 17 52 83"),
        ("The capital of France is Paris.", "Paris"),  # short text: what follows the copula
        ("Paris.", "Paris"),
        ("Sure! The capital of France is Paris. It is known for the Eiffel Tower.", "Paris"),
        ("Monsieur L'Hippel", "Monsieur L'Hippel"),
    ],
)
def test_natural_reads_what_instruct_models_write(reply: str, value: str):
    assert extract_answer(reply, "natural").value == value


def test_natural_missing_and_malformed():
    assert extract_answer("", "natural").status == "missing"
    assert extract_answer("   \n  ", "natural").status == "missing"
    long_prose = " ".join(["words"] * 40) + "."
    assert extract_answer(long_prose, "natural").status == "missing"  # no number, no short statement
    assert extract_answer("work\n#### ", "natural").status == "malformed"  # a broken marker stays broken


def test_a_chain_cut_off_by_its_token_limit_counts_only_with_a_marker():
    from ensemble_serve.shared.voting import candidate_from_text

    cut = candidate_from_text("m0", 0, "So the total is 12", 8, "natural", finished=False)
    assert (cut.status, cut.answer, cut.valid) == ("missing", None, False)  # never a vote for a half-written 12(0)
    marked = candidate_from_text("m0", 0, "step\n#### 5", 8, "natural", finished=False)
    assert (marked.status, marked.answer) == ("ok", "5")
    done = candidate_from_text("m0", 0, "So the total is 12.", 8, "natural", finished=True)
    assert (done.status, done.answer) == ("ok", "12")


def test_natural_agrees_with_auto_wherever_auto_finds_a_marker():
    for text in ("a\n#### 7", r"\boxed{x+1}", "#### 12 13", "the answer is 3, so \\boxed{4}"):
        assert extract_answer(text, "natural") == extract_answer(text, "auto")


def test_long_text_only_tail_searched():
    head = "#### 1\n" + "x" * (MAX_TEXT_CHARS + 10)
    assert extract_answer(head).status == "missing"
    assert extract_answer(head + "\n#### 2").value == "2"


# --- normalize / equality -----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("  1,234.00 ", "1234"),
        ("-0", "0"),
        ("42.", "42"),
        ("  Hello   World. ", "Hello World"),
        ("Hello", "Hello"),
        (7, "7"),
        (2.5, "2.5"),
        (1e-7, "0.0000001"),
        (-0.0, "0"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


def test_normalize_answer_rejects_bad_types():
    with pytest.raises(TypeError):
        normalize_answer(True)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        normalize_answer(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        normalize_answer(float("nan"))


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("3", "3.0", True),
        ("1,000", "1000", True),
        ("+5", 5, True),
        ("-0", "0", True),
        ("0.1", "0.10", True),
        ("0.1", "0.2", False),
        ("Paris", "Paris.", True),
        ("Paris", "paris", False),  # case is kept; semantic grouping happens elsewhere
        ("4 17 52", " 4  17 52 ", True),
        ("12", "twelve", False),
        (None, None, False),
        (None, "1", False),
        ("1", None, False),
    ],
)
def test_answers_equal(a, b, equal):
    assert answers_equal(a, b) is equal
