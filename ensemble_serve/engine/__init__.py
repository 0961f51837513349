"""Engines behind one interface (`base.Engine`): the in-process vLLM engine and remote vLLM servers. Online only."""
