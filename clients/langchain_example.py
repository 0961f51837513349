"""LangChain's `ChatOpenAI` pointed at ensemble-serve; ensemble options ride in `extra_body`.

LangChain keeps no unknown body field, so the body's `ensemble` object is lost to it; the server
also sends the vote in response headers, which `include_response_headers=True` puts in
`message.response_metadata["headers"]` (`vote_of` reads them back).

pip install langchain-openai
python -m clients.langchain_example --base-url http://127.0.0.1:8000/v1 "sort 52 17 83 4"
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import unquote


def build_llm(base_url: str, model: str = "sandbox-ensemble", vote: str | None = "majority"):
    """A chat model on the server; `vote` picks the ensemble's rule (None for a member, which takes no options)."""
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=base_url,
        api_key=os.environ.get("ENSEMBLE_SERVE_API_KEY", "none"),
        model=model,
        temperature=0.7,
        max_tokens=128,
        extra_body={"ensemble": {"vote": vote}} if vote is not None else None,
        include_response_headers=True,  # the vote rides in x-ensemble-* headers
    )


def vote_of(message: Any) -> dict[str, Any] | None:
    """The vote from a LangChain message's response headers; None for a member's (or a streamed) answer."""
    headers = {k.lower(): v for k, v in (message.response_metadata.get("headers") or {}).items()}
    if "x-ensemble-members" not in headers:
        return None
    agreement = headers.get("x-ensemble-agreement")
    return {
        "answer": unquote(headers["x-ensemble-answer"]) if "x-ensemble-answer" in headers else None,
        "answer_truncated": headers.get("x-ensemble-answer-truncated") == "true",
        "agreement": float(agreement) if agreement is not None else None,
        "members": [unquote(m) for m in headers["x-ensemble-members"].split(",") if m],
        "rule": unquote(headers.get("x-ensemble-rule", "")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="sort 52 17 83 4")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    llm = build_llm(args.base_url)
    message = llm.invoke(args.question)
    print(message.content)
    vote = vote_of(message)
    if vote is not None:
        print(f"vote: {vote['answer']!r} with agreement {vote['agreement']} from {', '.join(vote['members'])}")
    for chunk in llm.stream(args.question):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
