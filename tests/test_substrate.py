"""The substrate: tokenizer, training data, a short real training run, determinism, loading."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ensemble_serve.shared.cliutil import ConfigError, load_config
from trainer.models.config import SubstrateConfig
from trainer.models.substrate import REPORT_FILE, train_substrate
from trainer.tasks.data import IGNORE, batches, collate, encode_example, lr_at
from trainer.tasks.sandbox import DOMAINS, Problem, iter_problems
from trainer.tasks.tokenizer import CHARACTERS, build_tokenizer, prompt_text, render_prompt


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tokenizer_is_one_token_per_character_and_round_trips():
    tok = build_tokenizer(256)
    text = "".join(CHARACTERS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(tok("add 478+365\n#### 843", add_special_tokens=False)["input_ids"]) == "add 478+365\n#### 843"


def test_chat_template_matches_render_prompt():
    tok = build_tokenizer(256)
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "sort 3 1 2"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == render_prompt("sort 3 1 2") == "<|user|>sort 3 1 2\n<|assistant|>"
    # the role tokens are single special tokens
    assert len(tok(rendered, add_special_tokens=False)["input_ids"]) == len("sort 3 1 2\n") + 2


def test_encode_example_masks_the_prompt_and_ends_with_eos():
    tok = build_tokenizer(256)
    p = Problem(prompt="add 1+2", answer="3", chain="1+2=3\n#### 3", domain="add", difficulty=1)
    ids, labels = encode_example(tok, p, 256)
    n_prompt = len(render_prompt(p.prompt)) - len("<|user|>") - len("<|assistant|>") + 2
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:-1]) == p.chain and ids[-1] == tok.eos_token_id
    with pytest.raises(ValueError, match="no chain"):
        encode_example(tok, Problem(prompt="x", answer="1", chain=None, domain="user", difficulty=0), 256)


def test_batches_group_by_length_and_pad_right():
    tok = build_tokenizer(256)
    stream = batches(iter_problems(seed=3, split="train"), tok, batch_size=8, max_len=256, pool=4)
    b = next(stream)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    lengths = b["attention_mask"].sum(1)
    assert int(lengths.max()) == b["input_ids"].shape[1]
    assert (b["input_ids"][b["attention_mask"] == 0] == tok.pad_token_id).all()
    c = collate([([5, 6], [IGNORE, 6]), ([7], [7])], pad_id=0)
    assert c["input_ids"].tolist() == [[5, 6], [7, 0]] and c["labels"].tolist() == [[IGNORE, 6], [7, IGNORE]]


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_tiny_substrate_is_a_standard_hf_model_folder(tiny_substrate: Path):
    files = {p.name for p in tiny_substrate.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", REPORT_FILE} <= files
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in files)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_substrate))
    tok = AutoTokenizer.from_pretrained(str(tiny_substrate))
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert tok.chat_template and tok.eos_token == "<|eos|>"
    report = json.loads((tiny_substrate / REPORT_FILE).read_text())
    assert report["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(report["heldout_accuracy"]) == set(DOMAINS) | {"all"}
    assert all(0.0 <= v <= 1.0 for v in report["heldout_accuracy"].values())
    # 30 steps already bring the loss well below uniform guessing over the vocabulary (ln 103 = 4.6)
    assert report["final_loss"] < 3.0
    with torch.no_grad():
        ids = tok(render_prompt("add 12+34"), return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert torch.isfinite(model(ids).logits).all()


def _tiny(out: Path, seed: int) -> SubstrateConfig:
    return SubstrateConfig(
        out=out,
        seed=seed,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=1,
        steps=4,
        batch_size=4,
        eval_per_domain=0,
        max_position_embeddings=128,
    )


def test_training_is_deterministic_for_a_seed(tmp_path: Path):
    a = train_substrate(_tiny(tmp_path / "a", 7), progress=False)
    b = train_substrate(_tiny(tmp_path / "b", 7), progress=False)
    c = train_substrate(_tiny(tmp_path / "c", 8), progress=False)
    assert _sha(tmp_path / "a" / "model.safetensors") == _sha(tmp_path / "b" / "model.safetensors")
    assert _sha(tmp_path / "a" / "model.safetensors") != _sha(tmp_path / "c" / "model.safetensors")
    assert a["final_loss"] == b["final_loss"] != c["final_loss"]


def test_retraining_replaces_the_folder_whole(tmp_path: Path):
    out = tmp_path / "sub"
    train_substrate(_tiny(out, 1), progress=False)
    (out / "stale.txt").write_text("left over")
    train_substrate(_tiny(out, 2), progress=False)
    assert not (out / "stale.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize(
    "override, message",
    [
        ({"hidden_size": 130, "num_heads": 4}, "not divisible"),
        ({"hidden_size": 64, "num_heads": 4}, "multiple of 32"),
        ({"domains": ["add", "nope"]}, "unknown domain"),
        ({"difficulties": [0, 5]}, "difficulties"),
        ({"steps": 0}, "steps"),
        ({"no_such_option": 1}, "no_such_option"),
    ],
)
def test_bad_substrate_options_are_refused(override: dict, message: str):
    with pytest.raises(ConfigError, match=message):
        load_config(SubstrateConfig, None, override)


def test_bad_config_files_name_the_file(tmp_path: Path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_config(SubstrateConfig, missing, {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(SubstrateConfig, bad, {})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_config(SubstrateConfig, listy, {})
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps: many\n")
    with pytest.raises(ConfigError, match="wrong.yaml"):
        load_config(SubstrateConfig, wrong, {})


def test_shipped_configs_load():
    root = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(SubstrateConfig, root / "substrate.yaml", {"steps": 5})
    assert cfg.steps == 5 and cfg.hidden_size == 128 and cfg.domains == tuple(DOMAINS)


def test_prompt_text_uses_the_models_own_chat_template():
    tok = build_tokenizer(64)
    assert prompt_text(tok, "sort 3 1 2", "Be brief.") == render_prompt("sort 3 1 2", "Be brief.")
    tok.chat_template = (
        "{% if messages[0]['role'] != 'system' %}[default system]{% endif %}"
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    # a real instruct model's template: its default system prompt when none is given, as the server sends it
    assert prompt_text(tok, "hi") == "[default system]<user>hi<assistant>"
    assert prompt_text(tok, "hi", "Be brief.") == "<system>Be brief.<user>hi<assistant>"
    ids, labels = encode_example(tok, Problem(prompt="hi", answer="1", chain="1", domain="x", difficulty=1), 256)
    assert tok.decode(ids[: labels.count(IGNORE)]) == "[default system]<user>hi<assistant>"
