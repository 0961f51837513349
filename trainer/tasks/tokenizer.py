"""The sandbox substrate's tokenizer: one token per character, built with `tokenizers`.

A character vocabulary keeps the model tiny and makes every digit its own token,
which is what a small model needs to learn column arithmetic. It is saved as a
standard `PreTrainedTokenizerFast` folder (tokenizer.json + chat template), so
transformers, PEFT and vLLM load it unchanged.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM, UNK]
CHARACTERS = [chr(i) for i in range(32, 127)] + ["\n"]

# Messages are framed by role tokens; an assistant turn ends with EOS. The
# generation prompt is the bare assistant token, so a chat request and a
# completion request with the rendered template see the same tokens.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}" + SYSTEM + "{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}\n"
    "{% else %}" + ASSISTANT + "{{ m['content'] }}" + EOS + "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)


def build_tokenizer(model_max_length: int) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with role tokens and a chat template."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges splits any text into single characters; Fuse joins them back.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(SPECIAL_TOKENS)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def render_prompt(prompt: str, system: str | None = None) -> str:
    """The chat-templated text of a single user turn (after a system message, if any), ready for generation.

    Equal to `tokenizer.apply_chat_template([{"role": "system", ...}, {"role": "user", "content": prompt}],
    add_generation_prompt=True, tokenize=False)`, without a Jinja render per example.
    """
    head = f"{SYSTEM}{system}\n" if system is not None else ""
    return f"{head}{USER}{prompt}\n{ASSISTANT}"


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    tok.save_pretrained(str(out))
