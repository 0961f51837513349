"""Calling ensemble-serve with the official `openai` client: plain, streaming, and the `ensemble` object.

python -m clients.openai_client --base-url http://127.0.0.1:8000/v1 "add 478+365"
"""

from __future__ import annotations

import argparse
import os

import openai


def ask(client: openai.OpenAI, model: str, question: str, vote: str = "majority") -> tuple[str, dict]:
    """One ensemble request; returns the consensus chain and the `ensemble` object."""
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        temperature=0.7,
        max_tokens=128,
        # ensemble options travel in the request body; the client sends them with extra_body
        extra_body={"ensemble": {"vote": vote, "samples_per_member": 1, "return_chains": True}},
    )
    ensemble = resp.model_extra["ensemble"]  # fields the openai types do not know land in model_extra
    return resp.choices[0].message.content, ensemble


def stream(client: openai.OpenAI, model: str, question: str) -> tuple[str, dict | None]:
    """Streaming: for the ensemble, text arrives once the vote is in; the last chunk carries `ensemble`."""
    text, ensemble = [], None
    for chunk in client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=128,
        stream=True,
        stream_options={"include_usage": True},
    ):
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
        ensemble = (chunk.model_extra or {}).get("ensemble") or ensemble
    return "".join(text), ensemble


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="add 478+365")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="sandbox-ensemble")
    parser.add_argument("--vote", default="majority", choices=["majority", "weighted", "cross"])
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("ENSEMBLE_SERVE_API_KEY", "none"))

    print("models:", ", ".join(m.id for m in client.models.list().data))
    text, ens = ask(client, args.model, args.question, args.vote)
    print(f"\nconsensus chain:\n{text}\n")
    print(f"answer {ens['answer']!r}, agreement {ens['agreement']:.2f}, votes {ens['votes']}")
    for chain in ens["chains"]:
        print(f"  {chain['member']}#{chain['sample']}: {chain['status']:<9} {chain['answer']!r}")
    text, ens = stream(client, args.model, args.question)
    print(f"\nstreamed: {text!r} (answer {ens and ens['answer']!r})")


if __name__ == "__main__":
    main()
