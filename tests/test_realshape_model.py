"""The real-shaped test model (trainer/testing/realshape.py): what it is made of, and how its build is cached.

The tests on the built model are slow the first time (the build takes a few minutes on 2 cores,
then it is reused from the user cache, ~/.cache/ensemble-serve/); the tests of the cache itself stub the build and are fast.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import trainer.testing.realshape as rs

pytestmark = pytest.mark.timeout(1800)  # the first built test may build it
built = pytest.mark.realshape  # needs the built model

EXPECTED_ADAPTERS = {
    "qv8": (8, 16, {"q_proj", "v_proj"}),
    "all16": (16, 32, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "attn4": (4, 8, {"q_proj", "k_proj", "v_proj", "o_proj"}),
}


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _safetensors_header(path: Path) -> dict:
    """Each tensor's dtype and shape, read from the file's header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as st:
        return {
            key: {"dtype": st.get_slice(key).get_dtype(), "shape": st.get_slice(key).get_shape()}
            for key in st.keys()  # noqa: SIM118 (safe_open has no __iter__)
        }


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


@built
@pytest.mark.parametrize(
    "text, tokens",
    [("478+365", ["47", "8", "+", "36", "5"]), ("123456", ["12", "34", "56"]), ("#### 843", ["####", "Ġ", "84", "3"])],
)
def test_numbers_are_split_across_several_tokens_of_several_digits(realshape, text: str, tokens: list[str]) -> None:
    tok = _tokenizer(realshape.base)  # as transformers and vLLM load it
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == tokens
    digit_tokens = [t for t in tokens if t.isdigit()]
    assert len(digit_tokens) >= 2 and any(len(t) > 1 for t in digit_tokens)  # neither one per digit nor whole
    assert tok.decode(ids) == text


@built
def test_tokenizer_json_is_byte_level_bpe_and_agrees_with_transformers(realshape) -> None:
    """tokenizer.json groups digits itself (no per-digit split) and tokenizes exactly as transformers/vLLM do."""
    from tokenizers import Tokenizer

    from trainer.tasks.sandbox import generate_problems

    spec = json.loads((realshape.base / "tokenizer.json").read_text())
    assert spec["model"]["type"] == "BPE" and spec["decoder"]["type"] == "ByteLevel"
    byte_level = [p for p in spec["pre_tokenizer"]["pretokenizers"] if p["type"] == "ByteLevel"]
    assert byte_level and byte_level[0]["add_prefix_space"] is False
    raw = Tokenizer.from_file(str(realshape.base / "tokenizer.json"))
    assert [piece for piece, _ in raw.pre_tokenizer.pre_tokenize_str("123456")] == ["12", "34", "56"]
    assert 1000 <= raw.get_vocab_size() <= 2000

    tok = _tokenizer(realshape.base)
    assert type(tok).__name__ == "Qwen2Tokenizer"  # whatever tokenizer_config.json says, for a qwen2 model
    texts = []
    for p in generate_problems(60, seed=3, split="heldout", difficulties=[1, 2, 3, 4, 5, 6, 7, 8]):
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p.prompt}]
        rendered = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        texts += [p.prompt, p.chain, rendered + p.chain + rs.IM_END]
    for text in texts + ["x 2026-12-01 3.14159 ²³ ٣٤ done"]:
        assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text, add_special_tokens=False), text


@built
def test_chat_template_renders_a_system_message_and_the_generation_prompt(realshape) -> None:
    tok = _tokenizer(realshape.base)
    assert "chat_template" in json.loads((realshape.base / "tokenizer_config.json").read_text())
    user = {"role": "user", "content": "add 478+365"}
    with_system = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, user], tokenize=False, add_generation_prompt=True
    )
    assert with_system == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nadd 478+365<|im_end|>\n<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert without == "<|im_start|>user\nadd 478+365<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template([user], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nadd 478+365<|im_end|>\n"
    ids = tok.apply_chat_template([user], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == tok.encode(without, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")


@built
def test_special_tokens_are_single_tokens_that_decode_away(realshape) -> None:
    tok = _tokenizer(realshape.base)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for special in rs.SPECIAL_TOKENS:
        assert len(tok.encode(special, add_special_tokens=False)) == 1
        assert special in tok.all_special_tokens
    text = "<|im_start|>assistant\n8+5=13\n#### 843<|im_end|>\n<|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n8+5=13\n#### 843\n"
    assert tok.encode("add 1+2") == tok.encode("add 1+2", add_special_tokens=False)  # no BOS, as Qwen2


# ---------------------------------------------------------------------------------------------
# Model and adapters
# ---------------------------------------------------------------------------------------------


@built
def test_base_is_a_qwen2_model_folder_with_float32_safetensors(realshape) -> None:
    base = realshape.base
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ):
        assert (base / name).is_file(), name
    cfg = json.loads((base / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["max_position_embeddings"] >= 2048
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert cfg["hidden_size"] // cfg["num_attention_heads"] in (32, 64)  # head sizes vLLM's CPU attention takes
    tok = _tokenizer(base)
    assert cfg["vocab_size"] == len(tok)
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((base / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    tensors = _safetensors_header(base / "model.safetensors")
    assert {t["dtype"] for t in tensors.values()} == {"F32"}
    assert "model.layers.0.self_attn.q_proj.bias" in tensors  # Qwen2's biased q/k/v
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    assert tensors["model.layers.0.self_attn.k_proj.weight"]["shape"] == [
        cfg["num_key_value_heads"] * head_dim,
        cfg["hidden_size"],
    ]


@built
@pytest.mark.parametrize("name", list(EXPECTED_ADAPTERS))
def test_adapters_are_plain_peft_loras_in_safetensors(realshape, name: str) -> None:
    rank, alpha, targets = EXPECTED_ADAPTERS[name]
    folder = realshape.adapters[name]
    assert not (folder / "adapter_model.bin").exists()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"], set(cfg["target_modules"])) == (rank, alpha, targets)
    assert cfg["base_model_name_or_path"] == str(realshape.base)  # the final folder, not the build's temporary one
    tensors = _safetensors_header(folder / "adapter_model.safetensors")
    found = set()
    for key, info in tensors.items():
        assert key.startswith("base_model.model.model.layers.") and info["dtype"] == "F32", key
        module = key.split(".")[-3]
        found.add(module)
        if ".lora_A." in key:
            assert info["shape"][0] == rank, key
        else:
            assert ".lora_B." in key and info["shape"][1] == rank, key
    assert found == targets


@built
def test_the_build_recorded_accuracy_and_time(realshape) -> None:
    report = realshape.report
    assert report["base_accuracy"]["all"] > 0
    assert report["build_seconds"] > 0
    assert report["settings"] == json.loads(json.dumps(rs.SETTINGS))
    for name, (rank, _, targets) in EXPECTED_ADAPTERS.items():
        entry = report["adapters"][name]
        assert (entry["r"], set(entry["target_modules"])) == (rank, targets)
        assert 0 <= entry["accuracy"] <= 1
    assert any(entry["accuracy"] > 0 for entry in report["adapters"].values())


@built
def test_a_second_call_reuses_the_build(realshape, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(tmp: Path, final: Path) -> dict:
        raise AssertionError("rebuilt although the cache holds the build")

    monkeypatch.setattr(rs, "_build_into", no_rebuild)
    again = rs.build_realshape()
    assert again == realshape and (realshape.base.parent / rs.DONE).is_file()


# ---------------------------------------------------------------------------------------------
# The cache (the build itself stubbed)
# ---------------------------------------------------------------------------------------------


def _stub_build(monkeypatch: pytest.MonkeyPatch, calls: list[Path], seconds: float = 0.0) -> None:
    def build_into(tmp: Path, final: Path) -> dict:
        calls.append(final)
        (tmp / "base").mkdir(parents=True)
        time.sleep(seconds)
        return {"build_seconds": seconds}

    monkeypatch.setattr(rs, "_build_into", build_into)


def test_the_digest_covers_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    before = rs.build_digest()
    assert rs.build_digest() == before
    monkeypatch.setitem(rs.SETTINGS["base"], "steps", rs.SETTINGS["base"]["steps"] + 1)
    assert rs.build_digest() != before


def test_the_digest_ignores_comments_docstrings_and_formatting_but_not_code() -> None:
    text = Path(rs.__file__).read_text()
    key = rs._code_digest(text)
    reworded = text.replace('"""The cache key', '"""THE cache key').replace("# ---", "#  ---")
    assert reworded != text and rs._code_digest(reworded) == key
    assert rs._code_digest(text.replace("def _build(", "def _build_renamed(")) != key


def test_a_build_lands_whole_with_done_last_and_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    _stub_build(monkeypatch, calls)
    stale = tmp_path / f"realshape-{rs.build_digest()}.tmp-999999"  # a killed build's leftovers
    stale.mkdir()
    shape = rs.build_realshape(tmp_path)
    out = tmp_path / f"realshape-{rs.build_digest()}"
    assert shape.base == out / "base" and set(shape.adapters) == set(rs.SETTINGS["adapters"])
    assert (out / rs.DONE).is_file() and shape.report == {"build_seconds": 0.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "realshape.lock"])
    assert rs.build_realshape(tmp_path) == shape and calls == [out]


def test_a_folder_without_done_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    _stub_build(monkeypatch, calls)
    out = tmp_path / f"realshape-{rs.build_digest()}"
    (out / "base").mkdir(parents=True)  # half a build, no DONE
    rs.build_realshape(tmp_path)
    assert calls == [out] and (out / rs.DONE).is_file()


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    _stub_build(monkeypatch, calls, seconds=0.5)
    results: list[rs.RealShape] = []
    threads = [threading.Thread(target=lambda: results.append(rs.build_realshape(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 3 and len(set(r.base for r in results)) == 1


SHIPPED = Path(__file__).parent / "assets"


def test_the_shipped_build_is_the_current_key() -> None:
    """tests/assets holds the build of today's key: a clean clone's suite installs it instead of training.

    After a change to trainer/testing/realshape.py (or its settings, or a library's version) this fails:
    refresh the copy with `python -m trainer.testing.realshape --ship tests/assets`.
    """
    shipped = [p.name for p in SHIPPED.glob("realshape-*")]
    assert shipped == [f"realshape-{rs.build_digest()}"], (
        f"tests/assets holds {shipped}, the current key is realshape-{rs.build_digest()}: "
        "run `python -m trainer.testing.realshape --ship tests/assets`"
    )
    folder = SHIPPED / shipped[0]
    assert (folder / rs.DONE).is_file()
    for f in rs._base_references(folder):  # no folder of the machine that built it
        text = f.read_text()
        assert "/" + "root" not in text and ".cache" not in text, f
        if f.name == "adapter_config.json":
            assert json.loads(text)["base_model_name_or_path"] == rs.SHIPPED_BASE


def test_a_shipped_build_installs_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    _stub_build(monkeypatch, calls)
    shape = rs.build_realshape(tmp_path / "cache", shipped=SHIPPED)
    assert calls == [], "trained although a shipped build of the current key exists"
    assert (shape.base / "model.safetensors").is_file() and (shape.base.parent / rs.DONE).is_file()
    for name, folder in shape.adapters.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(shape.base), name  # named as a build names it
        assert rs.SHIPPED_BASE not in (folder / "README.md").read_text()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_a_shipped_build_of_another_key_or_without_done_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    _stub_build(monkeypatch, calls)
    shipped = tmp_path / "assets"
    (shipped / "realshape-000000000000").mkdir(parents=True)  # an old key
    (shipped / "realshape-000000000000" / rs.DONE).write_text("built\n")
    (shipped / f"realshape-{rs.build_digest()}" / "base").mkdir(parents=True)  # the current key, incomplete
    out = tmp_path / "cache" / f"realshape-{rs.build_digest()}"
    rs.build_realshape(tmp_path / "cache", shipped=shipped)
    assert calls == [out]


# ---------------------------------------------------------------------------------------------
# Bringing them in: `ensemble-train import` on this model, and what it refuses
# ---------------------------------------------------------------------------------------------


@built
def test_its_adapters_import_with_their_own_ranks_and_targets(realshape, tmp_path: Path) -> None:
    from ensemble_serve.shared.bring_your_own import AdapterSpec, import_adapters
    from ensemble_serve.shared.population import load_population

    specs = [AdapterSpec(name, path) for name, path in realshape.adapters.items()]
    pop = load_population(import_adapters(realshape.base, specs, tmp_path / "pop").root)
    assert pop.names == list(EXPECTED_ADAPTERS)
    assert [m.rank for m in pop.manifest.members] == [r for r, _, _ in EXPECTED_ADAPTERS.values()]
    assert all(m.fitness is None for m in pop.manifest.members)  # unknown until `eval`
    for name in pop.names:  # the copies name the base folder, the originals are untouched
        copied = json.loads((pop.member_dir(name) / "adapter_config.json").read_text())
        assert copied["base_model_name_or_path"] == realshape.base.name
        original = json.loads((realshape.adapters[name] / "adapter_config.json").read_text())
        assert original["base_model_name_or_path"] == str(realshape.base)


@built
def test_bad_adapters_for_this_model_are_refused_naming_them(realshape, tmp_path: Path) -> None:
    from ensemble_serve.shared.bring_your_own import AdapterSpec, import_adapters
    from ensemble_serve.shared.embedded import EMBEDDED_POPULATION, EMBEDDED_SUBSTRATE
    from ensemble_serve.shared.population import PopulationError

    def refused(base: Path, name: str, folder: Path, words: str, **kw) -> None:
        with pytest.raises(PopulationError, match=words):
            import_adapters(base, [AdapterSpec(name, folder)], tmp_path / f"pop-{name}", **kw)
        assert not (tmp_path / f"pop-{name}").exists()

    llama_member = EMBEDDED_POPULATION / "members" / "m00"  # the embedded Llama's adapter on this Qwen2
    refused(realshape.base, "m00", llama_member, "adapter 'm00' was trained on")
    refused(
        realshape.base, "m00", llama_member, "adapter 'm00': module .* made for another base", ignore_base_name=True
    )
    refused(EMBEDDED_SUBSTRATE, "qv8", realshape.adapters["qv8"], "adapter 'qv8' was trained on")
    refused(realshape.base, "all16", realshape.adapters["all16"], "set --max-lora-rank 16", max_lora_rank=8)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_bytes((realshape.adapters["qv8"] / "adapter_config.json").read_bytes())
    (pickled / "adapter_model.bin").write_bytes(b"\x80\x04.")  # a pickle, never loaded
    refused(realshape.base, "pickled", pickled, "only pickle weights")
    refused(realshape.base, "gone", tmp_path / "gone", "adapter 'gone': folder .* not found")
