"""``attn_implementation="attnpass_ssmax"`` on its own: parameters at construction, the identity at the
training length, plain save/load, and cached generation equal to a full recompute."""

from __future__ import annotations

import math

import pytest
import torch
import transformers as T

import attnpass  # noqa: F401  (registers the implementations)
from attnpass import hf
from tests import hf_corpus as C

TRAIN_LEN = 8


def _config(family: str, layers: int = 2, **extra) -> T.PretrainedConfig:
    common = {**C._decoder_common(), "use_cache": True, "num_hidden_layers": layers, "max_position_embeddings": 32}
    common.pop("attn_implementation")
    cls = {"llama": T.LlamaConfig, "qwen2": T.Qwen2Config}[family]
    return cls(num_key_value_heads=2, **common, **extra)


def _ssmax_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in ("ssmax_s", "ssmax_b")}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_from_config_builds_the_parameters_an_optimizer_then_trains(family: str) -> None:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(family), attn_implementation=hf.SSMAX)
    params = _ssmax_params(model)
    assert sorted(params) == [f"model.layers.{i}.self_attn.ssmax_s" for i in range(2)]
    for p in params.values():
        torch.testing.assert_close(p.detach(), torch.full((4,), 1 / math.log(32)))
    assert model.config.attnpass_ssmax == {"s": pytest.approx(1 / math.log(32)), "b": None, "train_len": 32,
                                           "replace_existing": False}
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.randint(3, C.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert all(not torch.equal(before[n], p.detach()) for n, p in params.items())


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_unchanged_at_the_training_length(family: str) -> None:
    """One layer, so the last row (the only one seeing exactly train_len keys) is the whole check."""
    torch.manual_seed(0)
    cfg = _config(family, layers=1, attnpass_ssmax={"train_len": TRAIN_LEN})
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation=hf.SSMAX).eval()
    eager = T.AutoModelForCausalLM.from_config(_config(family, layers=1), attn_implementation="eager").eval()
    missing = eager.load_state_dict(model.state_dict(), strict=False)
    assert set(missing.unexpected_keys) == set(_ssmax_params(model)) and not missing.missing_keys
    ids = torch.randint(3, C.VOCAB, (2, TRAIN_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, ref = model(ids).logits, eager(ids).logits
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-5, atol=1e-5)
    assert (out[:, 1] - ref[:, 1]).abs().max() > 1e-4  # SSMax is really on: shorter rows are sharper/flatter


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config("llama"), attn_implementation=hf.SSMAX).eval()
    with torch.no_grad():
        for i, p in enumerate(_ssmax_params(model).values()):
            p.add_(0.05 * (i + 1) * torch.arange(p.numel()))
    path = tmp_path_factory.mktemp("ssmax_llama")
    model.save_pretrained(path)
    return model, path


def test_plain_from_pretrained_restores_trained_s(trained_dir) -> None:
    model, path = trained_dir
    loaded = T.AutoModelForCausalLM.from_pretrained(path, attn_implementation=hf.SSMAX).eval()
    a, b = _ssmax_params(model), _ssmax_params(loaded)
    assert sorted(a) == sorted(b)
    for n in a:
        torch.testing.assert_close(b[n], a[n])
    ids = torch.randint(3, C.VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_a_checkpoint_without_ssmax_gets_the_identity_value(tmp_path) -> None:
    """A plain pretrained Llama loaded with the setting: s is initialised (not left as empty memory) to 1/log(train_len)."""
    torch.manual_seed(0)
    T.LlamaForCausalLM(_config("llama")).save_pretrained(tmp_path)
    cfg = T.AutoConfig.from_pretrained(tmp_path)
    cfg.attnpass_ssmax = {"train_len": 20}  # how a user gives the training length the config does not state
    loaded = T.AutoModelForCausalLM.from_pretrained(tmp_path, config=cfg, attn_implementation=hf.SSMAX)
    params = _ssmax_params(loaded)
    assert len(params) == 2
    for p in params.values():
        torch.testing.assert_close(p.detach(), torch.full((4,), 1 / math.log(20)))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_cache_equals_full_recompute(family: str, trained_dir) -> None:
    """Each decode step's logits equal the no-cache forward of the same sequence: n counts the whole cache."""
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(_config(family), attn_implementation=hf.SSMAX).eval()
    with torch.no_grad():
        for p in _ssmax_params(model).values():
            p.mul_(2.0)  # far from the identity, so a wrong n changes the logits
    ids = torch.randint(3, C.VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as batched generation uses
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    seq = out.sequences
    full_mask = torch.cat([mask, torch.ones(2, seq.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    position_ids = (full_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(seq, attention_mask=full_mask, position_ids=position_ids, use_cache=False).logits
    steps = torch.stack(out.logits, 1)
    torch.testing.assert_close(steps, full[:, ids.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    assert torch.equal(seq[:, ids.shape[1]:], full[:, ids.shape[1] - 1:-1].argmax(-1))


@pytest.mark.parametrize("family", ["llama4", "ministral3"])
def test_a_model_already_scaling_q_is_refused_then_replaced(family: str) -> None:
    """Llama 4 temperature tuning / llama_4_scaling already grow q with the position: SSMax on top is refused,
    and with replace_existing the scaling is switched off, so the model is SSMax on the same weights."""
    from attnpass.errors import AttnpassError
    from tests import relative_models as R

    def config(on: bool, **ssmax):
        if family == "llama4":
            cfg = R.llama4_config(on, **R.SMALL_L4)
        else:
            cfg = R.ministral3_config(**{**R.SMALL_M3, "beta": R.SMALL_M3["beta"] if on else 0.0})
        cfg.use_cache = True
        if ssmax:
            cfg.attnpass_ssmax = ssmax
        return cfg

    name = {"llama4": "Llama 4 attention temperature tuning", "ministral3": "llama_4_scaling"}[family]
    with pytest.raises(AttnpassError, match=name):
        T.AutoModelForCausalLM.from_config(config(True), attn_implementation=hf.SSMAX)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config(True, replace_existing=True, s=0.3), attn_implementation=hf.SSMAX).eval()
    plain = T.AutoModelForCausalLM.from_config(config(False, s=0.3), attn_implementation=hf.SSMAX).eval()
    plain.load_state_dict(model.state_dict())
    tuned = T.AutoModelForCausalLM.from_config(config(True), attn_implementation="eager").eval()
    with pytest.raises(AttnpassError, match=name):
        hf.to_ssmax(tuned, s=0.3)
    ids = torch.randint(3, C.VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain(ids).logits)
