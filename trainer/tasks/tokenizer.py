"""The sandbox substrate's tokenizer: one token per character, built with `tokenizers`.

A character vocabulary keeps the model tiny and makes every digit its own token,
which is what a small model needs to learn column arithmetic. It is saved as a
standard `PreTrainedTokenizerFast` folder (tokenizer.json + chat template), so
transformers, PEFT and vLLM load it unchanged.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

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


def prompt_text(tok: PreTrainedTokenizerBase, prompt: str, system: str | None = None) -> str:
    """The text a chat request with this user turn (after `system`, if any) sends to the model `tok` belongs to.

    The sandbox's template is rendered without Jinja (:func:`render_prompt`); any other model's (a real
    instruct model's ChatML with its default system prompt, say) through its own chat template, so
    members are trained on exactly the prompts the server will send them.
    """
    template = getattr(tok, "chat_template", None)
    if template is None or template == CHAT_TEMPLATE:
        return render_prompt(prompt, system)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}
    ]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(prompt: str, system: str | None = None) -> str:
    """The chat-templated text of a single user turn (after a system message, if any), ready for generation.

    Equal to `tokenizer.apply_chat_template([{"role": "system", ...}, {"role": "user", "content": prompt}],
    add_generation_prompt=True, tokenize=False)`, without a Jinja render per example.
    """
    head = f"{SYSTEM}{system}\n" if system is not None else ""
    return f"{head}{USER}{prompt}\n{ASSISTANT}"


def save_tokenizer(tok: PreTrainedTokenizerFast, out: Path) -> None:
    tok.save_pretrained(str(out))
