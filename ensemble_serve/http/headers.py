"""The vote in response headers, for clients that keep no unknown body field.

The `ensemble` object of a response body is invisible to clients that parse the body into their own
types (LangChain's `ChatOpenAI` keeps only the fields it knows). Headers are kept by all of them:
LangChain puts them in `response_metadata["headers"]` with `include_response_headers=True`, the
`openai` client returns them from `.with_raw_response`, curl prints them with `-i`.

A non-streamed ensemble response (a chat completion, or a completion of one prompt) carries:

* `x-ensemble-answer`: the winning answer, percent-encoded as UTF-8 (`urllib.parse.unquote` reads
  it back), its first :data:`MAX_ANSWER_CHARS` characters; absent when no chain had an answer;
* `x-ensemble-answer-truncated`: `true` when the answer was longer than that;
* `x-ensemble-agreement`: the share of the vote the answer got, 0..1; absent with the answer;
* `x-ensemble-members`: the members that answered, comma-separated, each percent-encoded;
* `x-ensemble-rule`: the vote rule;
* `x-ensemble-population`: the version of the population that answered (as `ensemble.population.version`).

Streams send their headers before any chain has finished, and a completion of several prompts has
one vote per prompt: neither carries these headers (the body's `ensemble` objects do).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

MAX_ANSWER_CHARS = 256

HEADERS: dict[str, str] = {
    "x-ensemble-answer": (
        f"The winning answer, percent-encoded UTF-8, at most {MAX_ANSWER_CHARS} characters before encoding; "
        "absent when no chain had an answer."
    ),
    "x-ensemble-answer-truncated": "`true` when the answer was cut to fit x-ensemble-answer.",
    "x-ensemble-agreement": "Share of the vote the winning answer got, 0..1; absent when no chain had an answer.",
    "x-ensemble-members": "The members that answered, comma-separated, each percent-encoded.",
    "x-ensemble-rule": "The vote rule that chose the answer.",
    "x-ensemble-population": (
        "The version of the population that answered, `<generation>-<12 hex digits>` (ensemble.population.version)."
    ),
}
"""Each header and what it holds (also the text of /openapi.json)."""


def ensemble_headers(response: Any) -> dict[str, str]:
    """The headers of a non-streamed response body: empty for a member's answer or several prompts."""
    info = getattr(response, "ensemble", None)
    if info is None:
        return {}
    headers = {
        "x-ensemble-members": ",".join(quote(name, safe="") for name in info.members),
        "x-ensemble-rule": quote(info.rule, safe=""),
    }
    if info.answer is not None:
        answer = info.answer[:MAX_ANSWER_CHARS]
        headers["x-ensemble-answer"] = quote(answer, safe="")
        if len(answer) < len(info.answer):
            headers["x-ensemble-answer-truncated"] = "true"
    if info.agreement is not None:
        headers["x-ensemble-agreement"] = f"{float(info.agreement):.4g}"
    if info.population is not None:
        headers["x-ensemble-population"] = quote(info.population.version, safe="")
    return headers
