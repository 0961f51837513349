"""Examples of calling ensemble-serve: openai client, streaming, RAG, LangChain."""
