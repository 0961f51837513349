"""LangChain's `ChatOpenAI` pointed at ensemble-serve; ensemble options ride in `extra_body`.

pip install langchain-openai
python -m clients.langchain_example --base-url http://127.0.0.1:8000/v1 "sort 52 17 83 4"
"""

from __future__ import annotations

import argparse
import os


def build_llm(base_url: str, model: str = "sandbox-ensemble", vote: str = "majority"):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=base_url,
        api_key=os.environ.get("ENSEMBLE_SERVE_API_KEY", "none"),
        model=model,
        temperature=0.7,
        max_tokens=128,
        extra_body={"ensemble": {"vote": vote}},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", nargs="?", default="sort 52 17 83 4")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    args = parser.parse_args()
    llm = build_llm(args.base_url)
    message = llm.invoke(args.question)
    print(message.content)
    for chunk in llm.stream(args.question):
        print(chunk.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
