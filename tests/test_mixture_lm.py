"""The gated mixture model (trainer/mixture_lm.py) against PEFT and the server's mixing code, on the embedded population."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ensemble_serve.shared.lora import load_lora, save_lora
from ensemble_serve.shared.mixture import mix_exact
from ensemble_serve.shared.population import load_population
from ensemble_serve.shared.router import normalised_weights, top_k
from ensemble_serve.testing.servers import plain_embedded
from trainer.models.mixture_lm import (
    MixtureLM,
    MixtureLMError,
    domain_nll,
    encode_chains,
    member_nll,
    mixture_weights,
    sequence_nlls,
    train_router_mixture,
)
from trainer.router.train import RouterTrainConfig
from trainer.tasks.data import collate
from trainer.tasks.sandbox import Problem, generate_problems

NAMES = ["m00", "m01", "m05"]  # ranks 4, 8 and 16: the concatenation mixes ranks


@pytest.fixture(scope="module")
def population():
    return load_population(plain_embedded())


@pytest.fixture(scope="module")
def members(population):
    return [load_lora(population.member_dir(n)) for n in NAMES]


@pytest.fixture(scope="module")
def lm(population, members):
    torch.manual_seed(0)
    return MixtureLM(population.base_model_path, members, NAMES)


@pytest.fixture(scope="module")
def problems():
    return generate_problems(6, seed=3, split="heldout")


@pytest.fixture(scope="module")
def batch(lm, problems):
    return collate(encode_chains(lm, problems), lm.tokenizer.pad_token_id)


def _peft_logits(base: Path, adapter_dir: Path, batch) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _mixed_logits(lm: MixtureLM, batch, weights: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), lm.weighted(weights):
        return lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _rows(weights: list[float], n: int) -> torch.Tensor:
    return torch.tensor([weights] * n, dtype=torch.float32)


def test_one_hot_weights_are_the_member_as_peft_runs_it(lm, population, batch):
    n = batch["input_ids"].shape[0]
    for i, name in enumerate(NAMES):
        onehot = _rows([1.0 if j == i else 0.0 for j in range(len(NAMES))], n)
        want = _peft_logits(population.base_model_path, population.member_dir(name), batch)
        torch.testing.assert_close(_mixed_logits(lm, batch, onehot), want, atol=2e-4, rtol=1e-4)


def test_weighted_mixture_is_the_servers_exact_mixed_adapter(lm, population, members, batch, tmp_path):
    w = [0.5, 0.3, 0.2]
    folder = save_lora(mix_exact(members, w), tmp_path / "mix")
    want = _peft_logits(population.base_model_path, folder, batch)
    got = _mixed_logits(lm, batch, _rows(w, batch["input_ids"].shape[0]))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_zero_weights_are_the_bare_base_and_close_removes_the_hooks(population, members, batch):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(population.base_model_path), dtype=torch.float32).eval()
    with torch.no_grad():
        want = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mlm = MixtureLM(population.base_model_path, members, NAMES)
    n = batch["input_ids"].shape[0]
    torch.testing.assert_close(_mixed_logits(mlm, batch, torch.zeros(n, 3)), want, atol=1e-5, rtol=1e-5)
    mlm.close()
    with torch.no_grad():  # no weights set and no hooks: the plain base
        plain = mlm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(plain, want, atol=1e-5, rtol=1e-5)


def test_each_sequence_of_a_batch_gets_its_own_weights(lm, batch):
    w = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]] * 2)
    together = _mixed_logits(lm, batch, w)
    for row in range(w.shape[0]):
        single = {k: v[row : row + 1] for k, v in batch.items()}
        alone = _mixed_logits(lm, single, w[row : row + 1])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-5, rtol=1e-5)


def test_nll_sums_agree_per_sequence_per_domain_and_per_member(lm, problems):
    enc = encode_chains(lm, problems)
    w = torch.full((len(problems), 3), 1 / 3)
    nll, count = sequence_nlls(lm, enc, w, batch_size=4)
    assert count.tolist() == [sum(x != -100 for x in labels[1:]) for _, labels in enc]
    per_domain = domain_nll(lm, problems, w, batch_size=2, encoded=enc)
    for d, (total, tokens) in per_domain.items():
        rows = [i for i, p in enumerate(problems) if p.domain == d]
        assert tokens == int(count[rows].sum())
        assert total == pytest.approx(float(nll[rows].sum()), rel=1e-5)
    cols, counts = member_nll(lm, enc, batch_size=3)
    assert cols.shape == (len(problems), 3) and torch.equal(counts, count)
    # mixing never makes a chain impossible, and each member alone gives a finite, positive NLL
    assert torch.isfinite(cols).all() and (cols > 0).all()


def test_mixture_weights_follow_the_servers_top_k_and_normalisation():
    gates = torch.tensor([[0.9, 0.1, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0]])
    for k in (1, 2, 3):
        w = mixture_weights(gates, top_k=k)
        for row in range(gates.shape[0]):
            chosen = top_k(gates[row], k)
            want = torch.zeros(4)
            want[chosen] = torch.tensor(normalised_weights(gates[row], chosen))
            torch.testing.assert_close(w[row], want)
    dense = mixture_weights(gates)
    torch.testing.assert_close(dense.sum(dim=1), torch.ones(4))
    torch.testing.assert_close(dense[3], torch.full((4,), 0.25))  # all-zero gates: uniform


def test_mixture_weights_pass_gradients_to_the_gates():
    logits = torch.zeros(2, 3, requires_grad=True)
    w = mixture_weights(torch.sigmoid(logits))
    (w[:, 0] * torch.tensor([1.0, 2.0])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("gates", "k", "match"),
    [
        (torch.tensor([[float("nan"), 1.0]]), None, "finite"),
        (torch.tensor([[-0.1, 1.0]]), None, ">= 0"),
        (torch.tensor([1.0, 2.0]), None, r"\[N, M\]"),
        (torch.zeros(2, 0), None, r"\[N, M\]"),
        (torch.tensor([[1.0, 2.0]]), 0, "top_k"),
    ],
)
def test_mixture_weights_refuse_bad_gates(gates, k, match):
    with pytest.raises(MixtureLMError, match=match):
        mixture_weights(gates, top_k=k)


def test_bad_weights_and_bad_chains_are_refused(lm, batch, problems):
    n = batch["input_ids"].shape[0]
    with pytest.raises(MixtureLMError, match=r"\[B, 3\]"):
        lm.sequence_nll(batch, torch.ones(n, 2))
    with pytest.raises(MixtureLMError, match="NaN or inf"):
        lm.sequence_nll(batch, torch.full((n, 3), float("nan")))
    with pytest.raises(MixtureLMError, match="weight rows"):
        lm.sequence_nll(batch, torch.ones(n + 1, 3))
    with pytest.raises(MixtureLMError, match="no reference chain"):
        encode_chains(lm, [Problem(prompt="1+1?", answer="2", chain=None, domain="add", difficulty=1)])
    with pytest.raises(MixtureLMError, match="weight rows"):
        sequence_nlls(lm, encode_chains(lm, problems), torch.ones(1, 3))


def test_members_of_another_base_are_refused(population, members):
    m = members[0]
    module = m.modules()[0]
    a, b = m.factors[module]
    wrong_shape = m.with_factors({**m.factors, module: (torch.zeros(a.shape[0], a.shape[1] + 8), b)}, m.rank, m.alpha)
    with pytest.raises(MixtureLMError, match="another base"):
        MixtureLM(population.base_model_path, [wrong_shape], ["m00"])
    renamed = {k.replace("q_proj", "qq_proj"): v for k, v in m.factors.items()}
    with pytest.raises(MixtureLMError, match="not a linear layer"):
        MixtureLM(population.base_model_path, [m.with_factors(renamed, m.rank, m.alpha)], ["m00"])
    with pytest.raises(MixtureLMError, match="names"):
        MixtureLM(population.base_model_path, members, ["m00"])
    with pytest.raises(MixtureLMError, match="at least one"):
        MixtureLM(population.base_model_path, [], [])


def test_a_router_trained_through_the_mixture_is_deterministic_and_learns(lm, population):
    from ensemble_serve.shared.router import RouterFeatures

    train = generate_problems(12, seed=5, split="train")
    enc = encode_chains(lm, train)
    feats = RouterFeatures(population.base_model_path)([p.prompt for p in train], "hidden_mean")
    cfg = RouterTrainConfig(steps=6, batch_size=6, lr=0.05, seed=3)
    r1, m1 = train_router_mixture(lm, feats, enc, "sandbox-substrate", cfg, domains=[p.domain for p in train])
    r2, _ = train_router_mixture(lm, feats, enc, "sandbox-substrate", cfg)
    for (k, v1), (_, v2) in zip(r1.state_dict().items(), r2.state_dict().items()):
        assert torch.equal(v1, v2), k
    assert m1["objective"] == "mixture" and m1["loss_curve"] and m1["final_loss"] > 0
    assert set(m1["specialisation"]) == {p.domain for p in train}
    # the gradient reached the router: its weights moved away from the seed's initialisation
    torch.manual_seed(3)
    from ensemble_serve.shared.router import Router

    fresh = Router(r1.cfg.model_copy(update={"trained_steps": 0, "metrics": {}}))
    moved = [
        k for k, v in r1.state_dict().items() if k.endswith("weight") and not torch.equal(v, fresh.state_dict()[k])
    ]
    assert moved
    with pytest.raises(MixtureLMError, match="feature rows"):
        train_router_mixture(lm, feats[:3], enc, "sandbox-substrate", cfg)
