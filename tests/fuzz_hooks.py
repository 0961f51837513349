"""schemathesis hooks for tests/hostile/test_fuzz_e2e.py.

- Cost bound: generated requests keep every field, but the knobs that multiply work (`max_tokens`,
  `n`, `samples_per_member`) are capped, so one example costs well under a second on 2 CPU cores and
  the fuzzing fits its time budget. Requests stay valid or invalid as generated: only numbers inside
  the documented range are lowered.
- Three rules of the server cannot be written in JSON Schema, and a schema-valid request that breaks
  one is answered 400 by design; `positive_data_acceptance` failures for exactly those are dropped:
  the prompt plus `max_tokens` exceeding the context (token counts: code `context_length_exceeded`),
  answer patterns outside RE2's syntax (the linear-time engine: "is not supported"; JSON Schema's
  `format: regex` is ECMA 262's syntax, which is neither Python's nor RE2's), and an adaptive wave
  larger than the fan-out (members x samples_per_member, two fields).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

from ensemble_serve.protocol import MAX_N, MAX_SAMPLES_PER_MEMBER

CONTEXT = int(os.environ.get("FUZZ_MAX_MODEL_LEN", "256"))  # the served model's context (set by the test)
# field -> (cap, documented maximum): a value in (cap, maximum] is lowered to the cap; a value beyond the
# maximum is left alone, so an invalid request stays invalid
CAPS = {"max_tokens": (8, CONTEXT), "max_completion_tokens": (8, CONTEXT), "n": (2, MAX_N)}
SAMPLES = (2, MAX_SAMPLES_PER_MEMBER)


def _lowered(value: Any, cap: int, maximum: int) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and cap < value <= maximum:
        return cap
    return value


def _cap(body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    for name, (cap, maximum) in CAPS.items():
        if name in body:
            body[name] = _lowered(body[name], cap, maximum)
    options = body.get("ensemble")
    if isinstance(options, dict) and "samples_per_member" in options:
        options["samples_per_member"] = _lowered(options["samples_per_member"], *SAMPLES)
    return body


@schemathesis.hook
def map_body(context: schemathesis.HookContext, body: Any) -> Any:
    return _cap(body)


@schemathesis.hook
def filter_failure(context: schemathesis.HookContext, failure: Any, case: Any, response: Any) -> bool:
    """False drops the failure: only the two inexpressible rules above, and only as 400s with their message."""
    if type(failure).__name__ != "RejectedPositiveData" or response.status_code != 400:
        return True
    try:
        error = response.json()["error"]
    except Exception:
        return True
    message = str(error.get("message"))
    inexpressible = (
        error.get("code") == "context_length_exceeded"
        or (
            error.get("param") == "ensemble.answer"
            and ("is not supported" in message or "invalid answer regex" in message)
        )
        or (error.get("param") == "ensemble.adaptive.wave_size" and "but the fan-out has" in message)
    )
    return not inexpressible
