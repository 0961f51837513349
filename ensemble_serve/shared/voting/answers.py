"""Final-answer extraction, shared by the server's voting and the trainer's verifier.

An extractor turns a model's free-form output into an :class:`Extraction`: the
normalized answer (``value``), a ``status`` ("ok"; "missing" when no answer was
found; "malformed" when an answer marker was found but its content is unusable)
and the answer text as found (``raw``).

A *spec* names the extractor: a mode from :data:`EXTRACTORS` ("auto", "marked",
"boxed", "number", "choice", "text") or ``{"regex": PATTERN}``. A client's pattern runs on
RE2 (linear time, see :func:`_regex_extractor`); the built-in modes' patterns are fixed.
Only the last :data:`MAX_TEXT_CHARS` characters of a text are searched.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

import re2  # google-re2, a maintained binding of RE2: client patterns run in linear time

MAX_TEXT_CHARS = 200_000

Status = Literal["ok", "missing", "malformed"]
AnswerSpec = str | Mapping[str, str]


@dataclass(frozen=True)
class Extraction:
    """The outcome of extracting a final answer from a text."""

    value: str | None  # normalized answer; None unless status == "ok"
    status: Status
    raw: str | None  # the answer (or the offending snippet) as found in the text

    @property
    def ok(self) -> bool:
        return self.status == "ok"


Extractor = Callable[[str], Extraction]

MISSING = Extraction(None, "missing", None)


def _ok(value: str, raw: str) -> Extraction:
    return Extraction(value, "ok", raw)


def _malformed(raw: str | None) -> Extraction:
    return Extraction(None, "malformed", raw)


# ---------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------

# A whole string that is a number: optional sign, strict thousands groups or plain digits, optional fraction.
_NUMBER_FULL = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)")

# A number inside running text. A sign only counts when it is not a binary operator ("3-5" -> 5);
# digits glued to a word or a decimal point are not a separate number.
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w)\]}])[+-])?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?![\d])|\d+)(?:\.\d+)?")


def canonical_number(s: str) -> str | None:
    """Canonical form of a numeric string ("+1,234.50" -> "1234.5", "-0" -> "0"); None if not a number."""
    s = s.strip()
    if not _NUMBER_FULL.fullmatch(s):
        return None
    negative = s[0] == "-"
    s = s.lstrip("+-").replace(",", "")
    int_part, _, frac = s.partition(".")
    int_part = int_part.lstrip("0") or "0"
    frac = frac.rstrip("0")
    if int_part == "0" and not frac:
        return "0"
    return ("-" if negative else "") + int_part + ("." + frac if frac else "")


def collapse_text(s: str) -> str:
    """Whitespace collapsed to single spaces, stripped, one trailing period removed."""
    s = " ".join(s.split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def _to_str(s: str | float) -> str:
    if isinstance(s, bool) or not isinstance(s, (str, int, float)):
        raise TypeError(f"an answer must be a string or a number, got {type(s).__name__}")
    if isinstance(s, float):
        if not math.isfinite(s):
            raise ValueError(f"an answer must be a finite number, got {s!r}")
        return format(Decimal(repr(s)), "f")
    return str(s)


def normalize_answer(s: str | float) -> str:
    """The canonical number if `s` is numeric, else the collapsed text (case kept)."""
    text = collapse_text(_to_str(s))
    return canonical_number(text) or text


def answers_equal(a: str | float | None, b: str | float | None) -> bool:
    """Numeric equality when both are numbers, else equality of normalized text; None equals nothing."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    num_a, num_b = canonical_number(na), canonical_number(nb)
    if num_a is not None and num_b is not None:
        return Decimal(num_a) == Decimal(num_b)
    return na == nb


# ---------------------------------------------------------------------------
# Locating answers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hit:
    """An answer marker found in a text: its content (None when empty or broken) and the snippet."""

    content: str | None
    snippet: str


_MARKED = re.compile(r"^[ \t]*####(?!#)(.*)$", re.MULTILINE)
_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b\s*:?|:)[ \t]*(?:\r?\n[ \t]*)?([^\r\n]*)", re.IGNORECASE)
_SNIPPET_CHARS = 200


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    found = None
    for match in pattern.finditer(text):
        found = match
    return found


def _marked_hit(text: str) -> _Hit | None:
    """The last line starting with '####'."""
    m = _last(_MARKED, text)
    if m is None:
        return None
    content = m.group(1).strip()
    return _Hit(content or None, m.group(0).strip())


def _boxed_hit(text: str) -> _Hit | None:
    """The last \\boxed{...}, braces balanced (escaped braces ignored)."""
    m = _last(_BOXED, text)
    if m is None:
        return None
    depth, i = 1, m.end()
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                content = text[m.end() : i].strip()
                return _Hit(content or None, text[m.start() : i + 1])
        i += 1
    return _Hit(None, text[m.start() : m.start() + _SNIPPET_CHARS])


def _marker_hit(text: str) -> _Hit | None:
    """A '####' line if any, else a \\boxed{} if any."""
    return _marked_hit(text) or _boxed_hit(text)


def _answer_is_contents(text: str) -> list[str]:
    """Non-empty texts after 'answer is' / 'answer:', last one last."""
    return [c for m in _ANSWER_IS.finditer(text) if (c := m.group(1).strip())]


def _from_hit(hit: _Hit, convert: Callable[[str], str | None]) -> Extraction:
    """Apply `convert` to a marker's content; empty, broken or unconvertible content is malformed."""
    if hit.content is None:
        return _malformed(hit.snippet)
    value = convert(hit.content)
    return _ok(value, hit.content) if value else _malformed(hit.content)


# ---------------------------------------------------------------------------
# Modes
# ---------------------------------------------------------------------------


def extract_marked(text: str) -> Extraction:
    """The last '#### answer' line (the sandbox's format)."""
    hit = _marked_hit(text)
    return MISSING if hit is None else _from_hit(hit, normalize_answer)


def extract_boxed(text: str) -> Extraction:
    """The last \\boxed{answer}."""
    hit = _boxed_hit(text)
    return MISSING if hit is None else _from_hit(hit, normalize_answer)


def extract_number(text: str) -> Extraction:
    """A marked/boxed answer that must be a number, else the last number in the text."""
    hit = _marker_hit(text)
    if hit is not None:
        return _from_hit(hit, lambda c: canonical_number(collapse_text(c)))
    m = _last(_NUMBER_IN_TEXT, text)
    if m is None:
        return MISSING
    return _ok(canonical_number(m.group(0)) or m.group(0), m.group(0))


_CHOICE_PAREN = re.compile(r"\(([A-Ea-e])\)(?!\w)")
_CHOICE_UPPER = re.compile(r"([A-E])(?![\w(])")
_CHOICE_ONLY = re.compile(r"\(?([A-Ea-e])\)?[.!]?")
_CHOICE_FINAL = re.compile(r"(?:^|\s)\(([A-Ea-e])\)[.!]?\s*\Z")


def _choice_letter(content: str) -> str | None:
    """'B', 'b', '(b)', 'B.', 'B because ...' -> 'B'; a bare lower-case letter only on its own."""
    m = _CHOICE_ONLY.fullmatch(content) or _CHOICE_PAREN.match(content) or _CHOICE_UPPER.match(content)
    return m.group(1).upper() if m else None


def extract_choice(text: str) -> Extraction:
    """A letter A-E from a marked/boxed answer, 'answer is (B)' / 'answer: B', or a final '(B)'."""
    hit = _marker_hit(text)
    if hit is not None:
        return _from_hit(hit, _choice_letter)
    for content in reversed(_answer_is_contents(text)):
        letter = _choice_letter(content)
        if letter:
            return _ok(letter, content)
    m = _CHOICE_FINAL.search(text)
    if m:
        return _ok(m.group(1).upper(), m.group(0).strip())
    return MISSING


def extract_text(text: str) -> Extraction:
    """A marked/boxed answer, else the text after the last 'answer is', else the whole text (case kept)."""
    hit = _marker_hit(text)
    if hit is not None:
        return _from_hit(hit, collapse_text)
    contents = _answer_is_contents(text)
    raw = contents[-1] if contents else text.strip()
    value = collapse_text(raw)
    return _ok(value, raw) if value else MISSING


def extract_auto(text: str) -> Extraction:
    """Marked, then boxed, then 'answer is X'; a number if it parses as one, else text. No fallback to stray numbers."""
    hit = _marker_hit(text)
    if hit is not None:
        return _from_hit(hit, normalize_answer)
    contents = _answer_is_contents(text)
    if not contents:
        return MISSING
    value = normalize_answer(contents[-1])
    return _ok(value, contents[-1]) if value else _malformed(contents[-1])


# A sentence ends at a newline, or at . ! ? followed by white space (so "2.5" and "e.g." inside a word stay whole).
_SENTENCE_END = re.compile(r"\n+|(?<=[.!?])\s+")
# "X is Y", "X are Y", "X was Y", "X equals Y", "X = Y": Y is the answer a short reply states.
_COPULA = re.compile(r"\s(?:is|are|was|were|equals|=)\s+(?!not\b)", re.IGNORECASE)
_LEAD = re.compile(r"^(?:so|thus|therefore|hence|yes|no|answer|final answer)\b[,:]?\s*", re.IGNORECASE)
NATURAL_MAX_WORDS = 12  # a text answer longer than this after reduction is not a short answer


def _sentences(text: str) -> list[str]:
    return [s for part in _SENTENCE_END.split(text.strip()) if (s := part.strip(" \t*-•>`\"'"))]


_NUMBER_LIST = re.compile(r"[+-]?\d[\d.,]*(?:\s*(?:,|;|\band\b|\s)\s*[+-]?\d[\d.,]*)+")


def _number_in(sentence: str) -> str | None:
    """The answer a sentence with digits states: a list of numbers, alone or after its copula ("is 4, 17,
    52" -> "4 17 52"), else its last number."""
    tail = _COPULA.split(sentence)[-1].strip().rstrip(".!?;:")
    if _NUMBER_LIST.fullmatch(tail):
        numbers = [canonical_number(m.group(0)) or m.group(0) for m in _NUMBER_IN_TEXT.finditer(tail)]
        if len(numbers) > 1:
            return " ".join(numbers)
    m = _last(_NUMBER_IN_TEXT, sentence)
    return None if m is None else m.group(0)


def _short_text(sentence: str) -> str | None:
    """A sentence reduced to the answer it states: after its last copula, without a lead-in or end mark."""
    sentence = _LEAD.sub("", sentence).strip()
    parts = _COPULA.split(sentence)
    answer = parts[-1] if len(parts) > 1 and parts[-1].strip() else sentence
    answer = collapse_text(answer.strip().rstrip(".!?;:,").strip())
    if not answer or len(answer.split()) > NATURAL_MAX_WORDS:
        return None
    return answer


def extract_natural(text: str) -> Extraction:
    """What an instruct model's natural reply answers, falling back only where `auto` finds nothing:

    1. `auto`: a '####' line, a \\boxed{}, or 'the answer is X' (the sandbox's and GSM8K's forms, read
       exactly as `auto` reads them), except that a number inside the stated answer is the answer
       ("The answer is 42 apples." -> 42; as lm-evaluation-harness's flexible extract takes the last number);
    2. a number in one of the last two sentences: the last number there ("17 + 25 = 42." -> 42,
       "So the total is 1,204 apples. Hope this helps!" -> 1204);
    3. a short text answer: the first sentence, reduced to what follows its last copula
       ("The capital of France is Paris." -> Paris; "Paris." -> Paris), at most 12 words.

    Only an empty reply, or one whose every sentence is long prose with no number, is "missing".
    """
    hit = _marker_hit(text)
    if hit is not None:
        return _from_hit(hit, normalize_answer)
    contents = _answer_is_contents(text)
    if contents:
        content = contents[-1]
        letter = _CHOICE_ONLY.fullmatch(content.strip())
        if letter:
            return _ok(letter.group(1).upper(), content)
        number = _number_in(content)
        if number is not None:
            return _ok(normalize_answer(number), content)
        value = _short_text(content) or collapse_text(content)
        return _ok(value, content) if value else _malformed(content)
    sentences = _sentences(text)
    for sentence in reversed(sentences[-2:]):
        number = _number_in(sentence)
        if number is not None:
            return _ok(normalize_answer(number), sentence)
    # the first sentence that states something ("X is Y"), else the first: "Sure! The capital ... is Paris." -> Paris
    stated = [t for t in sentences if len(_COPULA.split(_LEAD.sub("", t))) > 1]
    for sentence in (stated or sentences)[:1]:
        value = _short_text(sentence)
        if value:
            return _ok(value, sentence)
    return MISSING


def _guarded(fn: Extractor) -> Extractor:
    """Type-check the text and keep only its tail before any regex work."""

    @functools.wraps(fn)
    def wrapper(text: str) -> Extraction:
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return fn(text[-MAX_TEXT_CHARS:])

    return wrapper


EXTRACTORS: dict[str, Extractor] = {
    "auto": _guarded(extract_auto),
    "marked": _guarded(extract_marked),
    "boxed": _guarded(extract_boxed),
    "number": _guarded(extract_number),
    "choice": _guarded(extract_choice),
    "text": _guarded(extract_text),
    "natural": _guarded(extract_natural),
}
MODES = tuple(EXTRACTORS)
FREE_FORM = "text"  # the mode whose answers are free-form text, grouped by meaning rather than compared exactly


def is_free_form(spec: AnswerSpec) -> bool:
    """Whether answers extracted with `spec` are compared by meaning (sentence embeddings), not exactly."""
    return spec == FREE_FORM


MAX_REGEX_CHARS = 1000  # longest answer pattern a request may send


def _re2_pattern(pattern: str) -> str:
    """Python's spelling turned into RE2's where they differ: ``\\Z`` (end of text) is ``\\z`` in RE2."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            out.append("\\z" if nxt == "Z" else c + nxt)
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def _regex_extractor(pattern: str) -> Extractor:
    """A user pattern, checked with Python's parser (its messages) and run by RE2 (linear time).

    Python's backtracking engine can take exponential time on a pattern with nested quantifiers
    (``(a+)+$``) and does not check for signals while it runs: one request could stop the whole
    server. RE2 matches in time linear in the text, so a request's extraction is bounded by the
    length of its chains; features that need backtracking (backreferences, look-around, possessive
    quantifiers) are refused with RE2's message naming the construct.
    """
    if len(pattern) > MAX_REGEX_CHARS:
        raise ValueError(f"answer regex is {len(pattern)} characters long; at most {MAX_REGEX_CHARS} are allowed")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid answer regex {pattern!r}: {e}") from None
    options = re2.Options()
    options.log_errors = False
    try:
        compiled = re2.compile(_re2_pattern(pattern), options)
    except re2.error as e:
        why = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(
            f"answer regex {pattern!r} is not supported: {why}. Answer patterns run on RE2, a linear-time "
            "engine without backreferences, look-around or possessive quantifiers"
        ) from None

    def extract_regex(text: str) -> Extraction:
        """The last match: group 1 if the pattern has groups, else the whole match."""
        m = None
        for m in compiled.finditer(text):  # noqa: B007 (the last one is wanted)
            pass
        if m is None:
            return MISSING
        raw = m.group(1) if compiled.groups else m.group(0)
        value = normalize_answer(raw) if raw else ""
        return _ok(value, raw) if value else _malformed(m.group(0))

    return _guarded(extract_regex)


def get_extractor(spec: AnswerSpec) -> Extractor:
    """The extractor for a mode name or a ``{"regex": PATTERN}`` dict; ValueError for anything else."""
    valid = f"valid modes: {', '.join(MODES)}, or {{'regex': PATTERN}}"
    if isinstance(spec, str):
        try:
            return EXTRACTORS[spec]
        except KeyError:
            raise ValueError(f"unknown answer mode {spec!r}; {valid}") from None
    if isinstance(spec, Mapping):
        if set(spec) != {"regex"}:
            raise ValueError(
                f"an answer spec dict must have exactly the key 'regex', got keys {sorted(map(str, spec))}"
            )
        pattern = spec["regex"]
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"'regex' must be a non-empty string, got {pattern!r}")
        return _regex_extractor(pattern)
    raise ValueError(f"answer spec must be a mode name or a dict, got {type(spec).__name__}; {valid}")


def extract_answer(text: str, spec: AnswerSpec = "auto") -> Extraction:
    """Extract the final answer from `text` with the extractor named by `spec`."""
    return get_extractor(spec)(text)
