"""Models as they come (issue 15): a Hugging Face model with its KV cache on and its default attention goes
through find / fuse / to_ssmax / export, and what comes back serves other batch sizes and lengths."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import pytest
import torch
import transformers as T

import attnpass
from attnpass.export_inputs import SPECIALIZED, SPECIALIZED_LOGGER, cache_hint, quiet_auto_specialization


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2)
    model = T.LlamaForCausalLM(cfg).eval()
    assert model.config.use_cache  # as it comes: cache on, default attention
    return model, (torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0)),)


def _other_length() -> torch.Tensor:
    return torch.randint(0, 100, (3, 19), generator=torch.Generator().manual_seed(1))


def test_find_fuse_ssmax_on_a_default_model_serve_other_lengths(llama) -> None:
    model, args = llama
    assert len(attnpass.find(model, args).sites) == 2
    ids = _other_length()
    with torch.no_grad():
        ref = model(ids).logits
        fused = attnpass.fuse(model, args)
        torch.testing.assert_close(fused(ids).logits, ref, rtol=1e-5, atol=1e-5)
        ident = attnpass.to_ssmax(model, args, s=0.0, b=1.0)  # factor 1: the original model
        torch.testing.assert_close(ident(ids).logits, ref, rtol=1e-5, atol=1e-5)
        assert (attnpass.to_ssmax(model, args, s=0.5)(ids).logits - ref).abs().max() > 1e-4


def test_fixed_shapes_when_the_user_fixes_them(llama) -> None:
    model, args = llama
    fixed = attnpass.fuse(model, args, dynamic_shapes={"input_ids": None})
    with pytest.raises(Exception):  # noqa: B017  (torch raises its own guard error types)
        fixed(_other_length())


def test_export_a_default_model_serves_other_lengths(llama, tmp_path) -> None:
    from attnpass.validate import run

    model, args = llama
    res = attnpass.export(model, args, None, tmp_path / "fused.onnx", rewrite="fused")
    assert res.ok and res.sites == 2
    ids = _other_length()
    (logits,) = run(tmp_path / "fused.onnx", {"input_ids": ids.numpy()}).values()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(ids).logits, rtol=1e-4, atol=1e-4)


def test_a_cache_export_error_says_what_to_pass() -> None:
    err = ValueError("Found <class 'transformers.cache_utils.DynamicCache'> in output, which is not a known type. "
                     "If this type holds tensors, you need to register a pytree for it.")
    assert "use_cache=False" in cache_hint(err)
    assert cache_hint(ValueError("some other failure")) == ""


@contextlib.contextmanager
def _torch_log(name: str = SPECIALIZED_LOGGER) -> Iterator[list[str]]:
    """The messages that logger prints while the block runs.  torch prints them through its own handler, bound to
    the stderr of import time (pytest's, not the test's), so a handler on the logger is what sees them reliably."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def test_batch_one_fuse_prints_no_specialization_warning(llama, capfd) -> None:
    """Batch 1 fixes the batch axis our ``Dim.AUTO`` default asked for; a user calling ``fuse`` should not read
    torch's warning about our default, and the module still serves other sequence lengths."""
    model, _ = llama
    one = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    capfd.readouterr()
    with _torch_log() as seen:
        fused = attnpass.fuse(model, (one,))
    err = capfd.readouterr().err
    assert not any(SPECIALIZED in m for m in seen), seen
    assert SPECIALIZED not in err, err[-2000:]
    longer = torch.randint(0, 100, (1, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(longer).logits, model(longer).logits, rtol=1e-5, atol=1e-5)


def test_only_the_specialization_message_is_dropped() -> None:
    """The filter is exact (other records of torch's logger pass) and lasts only as long as our export."""
    message = f"dimension inputs['x'].shape[0] {SPECIALIZED} along with a sample input with hint = 1."
    logger = logging.getLogger(SPECIALIZED_LOGGER)
    with _torch_log() as seen:
        with quiet_auto_specialization():
            logger.warning(message)
            logger.warning("something else went wrong")
        logger.warning(message)
    assert seen == ["something else went wrong", message]
