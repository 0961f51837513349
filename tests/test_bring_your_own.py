"""Bring your own adapters: vLLM's --lora-modules forms, the checks against the base, the import.

Fast tests on a tiny random Qwen2 made here with transformers and adapters made with plain PEFT,
as a user would make them (the real-shaped model and the served path are in test_realshape_e2e.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM

from ensemble_serve.cli import main as serve_main
from ensemble_serve.config import ServeConfig
from ensemble_serve.shared.bring_your_own import (
    AdapterSpec,
    import_adapters,
    parse_lora_module,
    read_base_shapes,
)
from ensemble_serve.shared.cliutil import expand_nargs
from ensemble_serve.shared.population import PopulationError, load_population
from trainer.cli import main as train_main


def _base(folder: Path, hidden: int = 32) -> Path:
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
    )
    Qwen2ForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _adapter(base: Path, folder: Path, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), **save) -> Path:
    model = Qwen2ForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)  # PEFT starts B at zero; a trained adapter has not
    peft.save_pretrained(folder, **save)
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("byo")
    base = _base(root / "Tiny-Qwen2")
    other = _base(root / "Other-Qwen2", hidden=48)
    return {
        "base": base,
        "other": other,
        "qv4": _adapter(base, root / "qv4"),
        "all8": _adapter(base, root / "all8", r=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")),
        "rank32": _adapter(base, root / "rank32", r=32),
        "foreign": _adapter(other, root / "foreign"),
        "pickled": _adapter(base, root / "pickled", safe_serialization=False),
    }


def _rewrite(src: Path, dst: Path, **changes) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        dst.joinpath(f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


# --- vLLM's --lora-modules forms --------------------------------------------------------------


def test_lora_modules_forms_are_vllms() -> None:
    assert parse_lora_module("a=/x/y") == AdapterSpec("a", Path("/x/y"))
    spec = parse_lora_module('{"name": "b", "path": "/p", "base_model_name": "Qwen/Qwen2-0.5B"}')
    assert spec == AdapterSpec("b", Path("/p"), "Qwen/Qwen2-0.5B")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("nopath", "NAME=PATH"),
        ("a=", "NAME=PATH"),
        ("=p", "adapter name"),
        ("bad name=p", "adapter name"),
        ("{not json", "not valid JSON"),
        ('{"name": "a"}', "needs string `name` and `path`"),
        ('{"name": "a", "path": "p", "extra": 1}', "unknown keys ['extra']"),
        ('{"name": "a", "path": "p", "base_model_name": 3}', "base_model_name must be a string"),
    ],
)
def test_bad_lora_modules_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match="--lora-modules") as e:
        parse_lora_module(text)
    assert words in str(e.value)


def test_the_flag_takes_several_values_as_argparse_nargs() -> None:
    flags = ("--lora-modules",)
    assert expand_nargs(["--lora-modules", "a=1", "b=2", "--port", "3"], flags) == [
        "--lora-modules",
        "a=1",
        "--lora-modules",
        "b=2",
        "--port",
        "3",
    ]
    assert expand_nargs(["--lora-modules=a=1", "--lora-modules", "b=2"], flags) == [
        "--lora-modules=a=1",
        "--lora-modules",
        "b=2",
    ]


def test_serve_config_refuses_half_a_bring_your_own() -> None:
    with pytest.raises(ValueError, match="--model needs --lora-modules"):
        ServeConfig(model="/b")
    with pytest.raises(ValueError, match="--lora-modules needs --model"):
        ServeConfig(lora_modules=("a=/p",))
    with pytest.raises(ValueError, match="not both"):
        ServeConfig(model="/b", lora_modules=("a=/p",), population=Path("/pop"))
    with pytest.raises(ValueError, match="adapter name"):
        ServeConfig(model="/b", lora_modules=("bad name=/p",))
    cfg = ServeConfig(model="/b", lora_modules=("a=/p", '{"name": "c", "path": "/q"}'))
    assert [s.name for s in cfg.adapter_specs()] == ["a", "c"] and cfg.ensemble_name == "ensemble"


# --- the import --------------------------------------------------------------------------------


def test_import_makes_a_population_of_mixed_ranks_and_targets(made: dict[str, Path], tmp_path: Path) -> None:
    before = (made["qv4"] / "adapter_config.json").read_text()
    pop = import_adapters(
        made["base"], [AdapterSpec("qv4", made["qv4"]), AdapterSpec("all8", made["all8"])], tmp_path / "pop"
    )
    loaded = load_population(tmp_path / "pop")
    assert loaded.names == ["qv4", "all8"] == pop.names
    assert [m.rank for m in loaded.manifest.members] == [4, 8]
    assert all(m.fitness is None for m in loaded.manifest.members)
    assert loaded.base_model_path == made["base"].resolve()
    member = loaded.manifest.members[0]
    assert member.info["base_model_name_or_path"] == str(made["base"])
    assert sorted(member.info["target_modules"]) == ["q_proj", "v_proj"]
    copied = json.loads((loaded.member_dir("qv4") / "adapter_config.json").read_text())
    assert copied["base_model_name_or_path"] == loaded.manifest.base_model.name == "Tiny-Qwen2"
    assert (made["qv4"] / "adapter_config.json").read_text() == before  # the user's folder is untouched


def test_a_hub_name_matches_a_folder_of_that_name(made: dict[str, Path], tmp_path: Path) -> None:
    hub = _rewrite(made["qv4"], tmp_path / "hub", base_model_name_or_path="someorg/tiny-qwen2")
    import_adapters(made["base"], [AdapterSpec("hub", hub)], tmp_path / "pop")


def test_an_adapter_for_another_base_by_name_is_refused_naming_it(made: dict[str, Path], tmp_path: Path) -> None:
    named = _rewrite(made["qv4"], tmp_path / "named", base_model_name_or_path="meta-llama/Llama-3.1-8B")
    with pytest.raises(PopulationError, match=r"adapter 'named' was trained on 'meta-llama/Llama-3.1-8B'"):
        import_adapters(made["base"], [AdapterSpec("named", named)], tmp_path / "pop")
    assert not (tmp_path / "pop").exists()
    # the same model under another name: allowed on request, shapes still checked
    import_adapters(made["base"], [AdapterSpec("named", named)], tmp_path / "pop", ignore_base_name=True)
    # the --lora-modules JSON form's base_model_name is what the adapter is said to be for
    with pytest.raises(PopulationError, match="trained on 'x/Other'"):
        import_adapters(made["base"], [AdapterSpec("qv4", made["qv4"], "x/Other")], tmp_path / "pop2")


def test_the_same_model_under_another_folder_name_is_recognised_by_its_weights(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """An adapter that names a local folder is checked by what that folder holds, not by its name: the same
    weights elsewhere pass; a model of the same shapes but other weights (another checkpoint) is refused."""
    import shutil

    copy = tmp_path / "served-from-here"
    shutil.copytree(made["base"], copy)
    local = _rewrite(made["qv4"], tmp_path / "local", base_model_name_or_path=str(made["base"]))
    import_adapters(copy, [AdapterSpec("local", local)], tmp_path / "pop")
    sibling = _base(tmp_path / "Tiny-Qwen2-retrained")  # the same shapes, other weights
    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2ForCausalLM.from_pretrained(sibling).config).save_pretrained(sibling)
    other = _rewrite(made["qv4"], tmp_path / "other", base_model_name_or_path=str(sibling))
    with pytest.raises(PopulationError, match="nothing shows that it is the same model"):
        import_adapters(copy, [AdapterSpec("other", other)], tmp_path / "pop2")


def test_a_member_offered_to_its_base_under_another_name_passes_by_the_manifests_fingerprint(
    made: dict[str, Path], tmp_path: Path
) -> None:
    """Members of a population directory name its base (`sandbox-substrate`); served on that base from a folder
    named otherwise, the manifest's fingerprint of the base says it is the same model. Another base is refused."""
    pop = import_adapters(made["base"], [AdapterSpec("m00", made["qv4"])], tmp_path / "pop")
    member = pop.member_dir("m00")
    cfg = json.loads((member / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == pop.manifest.base_model.name == "Tiny-Qwen2"
    import shutil

    renamed = tmp_path / "weights-as-served"
    shutil.copytree(made["base"], renamed)
    import_adapters(renamed, [AdapterSpec("m00", member)], tmp_path / "again")
    with pytest.raises(PopulationError, match="was trained on 'Tiny-Qwen2'"):
        import_adapters(made["other"], [AdapterSpec("m00", member)], tmp_path / "elsewhere")


def test_a_converted_model_answers_to_its_source_files_name(made: dict[str, Path], tmp_path: Path) -> None:
    """A base made by `ensemble-train base --from-gguf` records its source; an adapter trained on the original
    (by its hub name) is recognised on the converted folder, whatever the folder is called."""
    import shutil

    converted = tmp_path / "converted"
    shutil.copytree(made["base"], converted)
    (converted / "source.json").write_text(json.dumps({"format": "gguf", "file": "Tiny-Qwen2-Chat.Q4_1.gguf"}))
    hub = _rewrite(made["qv4"], tmp_path / "hub", base_model_name_or_path="someorg/Tiny-Qwen2-Chat")
    import_adapters(converted, [AdapterSpec("hub", hub)], tmp_path / "pop")


def test_an_adapter_for_another_base_by_shape_is_refused_naming_it(made: dict[str, Path], tmp_path: Path) -> None:
    silent = _rewrite(made["foreign"], tmp_path / "silent", base_model_name_or_path=None)
    with pytest.raises(PopulationError, match=r"adapter 'silent': module .*q_proj.* made for another base"):
        import_adapters(made["base"], [AdapterSpec("silent", silent)], tmp_path / "pop")
    with pytest.raises(PopulationError, match=r"adapter 'foreign': module .* made for another base"):
        import_adapters(
            made["base"], [AdapterSpec("foreign", made["foreign"])], tmp_path / "pop", ignore_base_name=True
        )


def test_a_rank_above_max_lora_rank_is_refused_with_the_flag(made: dict[str, Path], tmp_path: Path) -> None:
    spec = [AdapterSpec("rank32", made["rank32"])]
    with pytest.raises(PopulationError, match="rank 32, above --max-lora-rank 16: set --max-lora-rank 32"):
        import_adapters(made["base"], spec, tmp_path / "pop", max_lora_rank=16)
    assert load_population(import_adapters(made["base"], spec, tmp_path / "pop").root).manifest.members[0].rank == 32


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing", "adapter 'x': folder .* not found"),
        ("file", "adapter 'x': .* is not a folder"),
        ("no_config", "adapter 'x': .* has no adapter_config.json"),
        ("pickled", r"adapter 'x': only pickle weights \['adapter_model.bin'\], which are refused"),
        ("unknown_target", r"adapter 'x': target modules \['q_prj'\] are not modules of the base"),
        ("not_lora", "adapter 'x': peft_type is 'IA3'"),
        ("modules_to_save", "adapter 'x': modules_to_save"),
        ("dora", "adapter 'x': DoRA"),
        ("bad_rank", "adapter 'x': r=0"),
        ("corrupt", "adapter 'x': .* not a readable safetensors file"),
    ],
)
def test_bad_adapters_get_a_clear_error(made: dict[str, Path], tmp_path: Path, case: str, words: str) -> None:
    src = made["qv4"]
    folder = {
        "missing": lambda: tmp_path / "nowhere",
        "file": lambda: (tmp_path / "f.txt").write_text("x") and tmp_path / "f.txt",
        "no_config": lambda: (tmp_path / "empty").mkdir() or tmp_path / "empty",
        "pickled": lambda: made["pickled"],
        "unknown_target": lambda: _rewrite(src, tmp_path / "a", target_modules=["q_prj"]),
        "not_lora": lambda: _rewrite(src, tmp_path / "a", peft_type="IA3"),
        "modules_to_save": lambda: _rewrite(src, tmp_path / "a", modules_to_save=["lm_head"]),
        "dora": lambda: _rewrite(src, tmp_path / "a", use_dora=True),
        "bad_rank": lambda: _rewrite(src, tmp_path / "a", r=0),
        "corrupt": lambda: _corrupt(_rewrite(src, tmp_path / "a")),
    }[case]()
    with pytest.raises(PopulationError, match=words):
        import_adapters(made["base"], [AdapterSpec("x", folder)], tmp_path / "pop")
    assert not (tmp_path / "pop").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def _corrupt(folder: Path) -> Path:
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    return folder


def test_a_tensor_for_a_module_the_base_lacks_is_an_unknown_target(made: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    odd = _rewrite(made["qv4"], tmp_path / "odd")
    tensors = load_file(odd / "adapter_model.safetensors")
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in tensors.items()}
    save_file(renamed, odd / "adapter_model.safetensors")
    (odd / "adapter_config.json").write_text(
        json.dumps({**json.loads((odd / "adapter_config.json").read_text()), "target_modules": "all-linear"})
    )
    with pytest.raises(PopulationError, match=r"adapter 'odd': module .*qq_proj is not in the base .*unknown target"):
        import_adapters(made["base"], [AdapterSpec("odd", odd)], tmp_path / "pop")


def test_the_base_must_be_a_safetensors_model_folder(made: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PopulationError, match="base model folder not found"):
        read_base_shapes(tmp_path / "nope")
    (tmp_path / "pk").mkdir()
    (tmp_path / "pk" / "config.json").write_text("{}")
    (tmp_path / "pk" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(PopulationError, match="only pickle weights"):
        read_base_shapes(tmp_path / "pk")


def test_names_twice_and_an_existing_destination_are_refused(made: dict[str, Path], tmp_path: Path) -> None:
    spec = AdapterSpec("qv4", made["qv4"])
    with pytest.raises(PopulationError, match="given twice"):
        import_adapters(made["base"], [spec, spec], tmp_path / "pop")
    import_adapters(made["base"], [spec], tmp_path / "pop")
    with pytest.raises(PopulationError, match="already exists"):
        import_adapters(made["base"], [spec], tmp_path / "pop")
    import_adapters(made["base"], [AdapterSpec("all8", made["all8"])], tmp_path / "pop", overwrite=True)
    assert load_population(tmp_path / "pop").names == ["all8"]


# --- the commands --------------------------------------------------------------------------------


def test_ensemble_train_import_command(made: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pop"
    args = ["import", "--model", str(made["base"]), "--lora-modules", f"qv4={made['qv4']}", f"all8={made['all8']}"]
    res = CliRunner().invoke(train_main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "qv4: rank 4" in res.output and load_population(out).names == ["qv4", "all8"]
    bad = CliRunner().invoke(train_main, [*args[:4], "x=" + str(tmp_path / "gone"), "--out", str(tmp_path / "p2")])
    assert bad.exit_code == 1 and "adapter 'x': folder" in bad.output
    usage = CliRunner().invoke(train_main, [*args[:4], "{oops", "--out", str(tmp_path / "p3")])
    assert usage.exit_code == 2 and "not valid JSON" in usage.output


def test_ensemble_serve_up_checks_adapters_before_the_engine(made: dict[str, Path], tmp_path: Path) -> None:
    base = ["up", "--model", str(made["base"])]
    res = CliRunner().invoke(serve_main, base)
    assert res.exit_code == 2 and "--model needs --lora-modules" in res.output
    res = CliRunner().invoke(serve_main, [*base, "--lora-modules", f"f={made['foreign']}"])
    assert res.exit_code == 1 and "adapter 'f' was trained on" in res.output
    res = CliRunner().invoke(serve_main, [*base, "--lora-modules", f"r={made['rank32']}", "--max-lora-rank", "16"])
    assert res.exit_code == 1 and "set --max-lora-rank 32" in res.output


def test_ensemble_serve_up_refuses_a_base_without_a_tokenizer_in_one_line(made: dict[str, Path]) -> None:
    # the tiny base is weights and config only: vLLM could not tokenize a prompt for it
    res = CliRunner().invoke(serve_main, ["up", "--model", str(made["base"]), "--lora-modules", f"a={made['qv4']}"])
    assert res.exit_code == 1 and "has no tokenizer" in res.output and "Traceback" not in res.output
    assert not any(made["base"].glob("tokenizer*"))
