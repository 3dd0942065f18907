"""SSMax on the decode-time ONNX attention ops, checked by decoding in onnxruntime.

Each tiny decoder (``kv_models.py``) is rewritten to SSMax, then run as a generation loop does: a prefill,
then single-token steps feeding the returned cache back.  Every step's logits must equal a full recompute of
the same SSMax model over the whole prefix (no cache), and ``attnpass.semantics`` on the same weights: a
decode step whose ``n`` counted only the new key (or the cache buffer's length) would differ.  The original
model's own decode loop is checked the same way, so a difference is the rewrite's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import attnpass.onnx as aonnx
from tests import kv_models as M
from tests.kv_models import KH, VOCAB, D, H, Weights

S_SSMAX, B_SSMAX = 0.7, 0.3
STEPS = 3
TOL = 1e-3  # absolute, on logits of magnitude ~50-80 (float32: ~1e-5 measured); SSMax moves them by > 1


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _tokens(batch: int, length: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, VOCAB, (batch, length)).astype(np.int64)


# ---------------------------------------------------------------- one decode loop per op: per-step last logits
# Each ``decode_*`` returns [steps + 1] arrays [B, V] (the prefill's last valid row, then each step), and each
# ``recompute_*`` the logits of a prefix's last position from one run without a cache.

def _empty(batch: int, kv_heads: int, dtype: type = np.float32) -> np.ndarray:
    return np.zeros((batch, kv_heads, 0, D), dtype)


def _cache_dtype(sess) -> type:
    return np.float16 if sess.get_inputs()[1].type == "tensor(float16)" else np.float32


def decode_gqa(sess, seqs: np.ndarray, lens: list[int], kv_heads: int) -> list[np.ndarray]:
    """Right-padded ragged prompts (``seqlens_k`` per entry), then one token per step."""
    batch, p = len(lens), max(lens)
    ids = seqs[:, :p].copy()
    for b, n in enumerate(lens):
        ids[b, n:] = 0
    lens_a, dt = np.array(lens, np.int32), _cache_dtype(sess)
    feeds = {"input_ids": ids, "past_key": _empty(batch, kv_heads, dt), "past_value": _empty(batch, kv_heads, dt),
             "seqlens_k": lens_a - 1, "total_sequence_length": np.array(p, np.int32)}
    logits, pk, pv = sess.run(None, feeds)
    got = [logits[np.arange(batch), lens_a - 1]]
    for t in range(1, STEPS + 1):
        step_ids = seqs[np.arange(batch), lens_a + t - 1][:, None]
        feeds = {"input_ids": step_ids, "past_key": pk, "past_value": pv, "seqlens_k": lens_a - 1 + t,
                 "total_sequence_length": np.array(p + t, np.int32)}
        logits, pk, pv = sess.run(None, feeds)
        got.append(logits[:, 0])
    return got


def recompute_gqa(sess, prefix: np.ndarray, kv_heads: int) -> np.ndarray:
    n, dt = prefix.shape[0], _cache_dtype(sess)
    feeds = {"input_ids": prefix[None], "past_key": _empty(1, kv_heads, dt), "past_value": _empty(1, kv_heads, dt),
             "seqlens_k": np.array([n - 1], np.int32), "total_sequence_length": np.array(n, np.int32)}
    return sess.run(None, feeds)[0][0, -1]


def decode_ms_attention(sess, seqs: np.ndarray, mask: np.ndarray, p: int) -> list[np.ndarray]:
    """``com.microsoft.Attention``: left-padded prompts (``mask_index [B, T]``), the packed ``past``."""
    batch = seqs.shape[0]
    feeds = {"input_ids": seqs[:, :p], "attention_mask": mask[:, :p], "past": np.zeros((2, batch, H, 0, D), np.float32)}
    logits, past = sess.run(None, feeds)
    got = [logits[:, -1]]
    for t in range(1, STEPS + 1):
        feeds = {"input_ids": seqs[:, p + t - 1:p + t], "attention_mask": mask[:, :p + t], "past": past}
        logits, past = sess.run(None, feeds)
        got.append(logits[:, 0])
    return got


def recompute_ms_attention(sess, prefix: np.ndarray, mask: np.ndarray) -> np.ndarray:
    feeds = {"input_ids": prefix, "attention_mask": mask, "past": np.zeros((2, prefix.shape[0], H, 0, D), np.float32)}
    return sess.run(None, feeds)[0][:, -1]


def decode_past(sess, seqs: np.ndarray, mask: np.ndarray | None, p: int, kv_heads: int) -> list[np.ndarray]:
    """Opset-23/24 ``Attention`` with ``past_key``/``past_value`` (``mask``: a left-padding key mask)."""
    batch = seqs.shape[0]
    extra = (lambda t: {"attention_mask": mask[:, :t]}) if mask is not None else (lambda t: {})
    feeds = {"input_ids": seqs[:, :p], "past_key": _empty(batch, kv_heads), "past_value": _empty(batch, kv_heads), **extra(p)}
    logits, pk, pv = sess.run(None, feeds)
    got = [logits[:, -1]]
    for t in range(1, STEPS + 1):
        feeds = {"input_ids": seqs[:, p + t - 1:p + t], "past_key": pk, "past_value": pv, **extra(p + t)}
        logits, pk, pv = sess.run(None, feeds)
        got.append(logits[:, 0])
    return got


def recompute_past(sess, prefix: np.ndarray, mask: np.ndarray | None, kv_heads: int) -> np.ndarray:
    batch = prefix.shape[0]
    feeds = {"input_ids": prefix, "past_key": _empty(batch, kv_heads), "past_value": _empty(batch, kv_heads)}
    if mask is not None:
        feeds["attention_mask"] = mask
    return sess.run(None, feeds)[0][:, -1]


MAX_LEN = 12


def _nonpad_feeds(ids: np.ndarray, ck: np.ndarray, cv: np.ndarray, write: np.ndarray, valid: np.ndarray) -> dict:
    return {"input_ids": ids, "cache_k": ck, "cache_v": cv, "write_indices": write.astype(np.int64),
            "nonpad_kv_seqlen": valid.astype(np.int64)}


def decode_nonpad(sess, seqs: np.ndarray, lens: list[int], kv_heads: int) -> list[np.ndarray]:
    """Opset-24 ``Attention`` over a cache buffer: each prompt prefilled on its own (the op aligns its causal
    diagonal to the end of ``nonpad_kv_seqlen``), the buffers stacked, then ragged steps in one batch."""
    caches, first = [], []
    for b, n in enumerate(lens):
        z = np.zeros((1, kv_heads, MAX_LEN, D), np.float32)
        logits, ck, cv = sess.run(None, _nonpad_feeds(seqs[b:b + 1, :n], z, z, np.array([0]), np.array([n])))
        caches.append((ck, cv))
        first.append(logits[0, -1])
    ck, cv = (np.concatenate([c[i] for c in caches]) for i in (0, 1))
    lens_a, got = np.array(lens), [np.stack(first)]
    for t in range(1, STEPS + 1):
        ids = seqs[np.arange(len(lens)), lens_a + t - 1][:, None]
        logits, ck, cv = sess.run(None, _nonpad_feeds(ids, ck, cv, lens_a + t - 1, lens_a + t))
        got.append(logits[:, 0])
    return got


def recompute_nonpad(sess, prefix: np.ndarray, kv_heads: int) -> np.ndarray:
    z = np.zeros((1, kv_heads, MAX_LEN, D), np.float32)
    n = prefix.shape[0]
    return sess.run(None, _nonpad_feeds(prefix[None], z, z, np.array([0]), np.array([n])))[0][0, -1]


# ---------------------------------------------------------------- the cases

class Case:
    """A decoder model, its decode loop, and per step the expected logits (recompute and semantics)."""

    def __init__(self, name: str, build: Callable[[Weights], onnx.ModelProto], kv_heads: int = KH, **kw):
        self.name, self.build, self.kv_heads, self.kw = name, build, kv_heads, kw

    def __repr__(self) -> str:
        return self.name


LENS = [5, 3]  # ragged prompts: the second sequence's steps see fewer keys
P_FIXED = 5
LEFT_PAD = np.array([[1] * (P_FIXED + STEPS), [0, 0] + [1] * (P_FIXED + STEPS - 2)], np.int32)

CASES = [
    Case("gqa", M.gqa_model, kind="gqa"),
    Case("gqa_packed_qkv", lambda w: M.gqa_model(w, packed=True), kind="gqa"),
    Case("gqa_local_window", lambda w: M.gqa_model(w, window=3), kind="gqa", window=3),
    Case("gqa_rotary", lambda w: M.gqa_model(w, rotary=True), kind="gqa", rotary=True),
    # float16: the scaled Q is rounded once more than ``semantics``' (logits ~80: 5e-4 relative); a wrong n moves them by > 0.5
    Case("gqa_fp16", lambda w: M.gqa_model(w, fp16=True), kind="gqa", tol=6e-2),
    Case("ms_attention", M.ms_attention_model, kv_heads=H, kind="ms"),
    Case("attention23_past", lambda w: M.attention_past_model(w, 23), kind="past"),
    Case("attention24_past_mask", lambda w: M.attention_past_model(w, 24, mask=True), kind="past", mask=True),
    Case("attention24_nonpad", M.attention_nonpad_model, kind="nonpad"),
]


def _decode(case: Case, path: Path, seqs: np.ndarray) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[list[np.ndarray]]]:
    """(decode logits per step, recompute per step and entry, prefixes per step and entry)."""
    sess, kind, kvh = _session(path), case.kw["kind"], case.kv_heads
    mask = LEFT_PAD.astype(bool) if case.kw.get("mask") else None
    if kind == "gqa":
        got = decode_gqa(sess, seqs, LENS, kvh)
        prefixes = [[seqs[b, :n + t] for b, n in enumerate(LENS)] for t in range(STEPS + 1)]
        want = [[recompute_gqa(sess, x, kvh) for x in row] for row in prefixes]
    elif kind == "nonpad":
        got = decode_nonpad(sess, seqs, LENS, kvh)
        prefixes = [[seqs[b, :n + t] for b, n in enumerate(LENS)] for t in range(STEPS + 1)]
        want = [[recompute_nonpad(sess, x, kvh) for x in row] for row in prefixes]
    elif kind == "ms":
        got = decode_ms_attention(sess, seqs, LEFT_PAD, P_FIXED)
        prefixes = [list(seqs[:, :P_FIXED + t]) for t in range(STEPS + 1)]
        want = [list(recompute_ms_attention(sess, seqs[:, :P_FIXED + t], LEFT_PAD[:, :P_FIXED + t])) for t in range(STEPS + 1)]
    else:
        got = decode_past(sess, seqs, mask, P_FIXED, kvh)
        prefixes = [list(seqs[:, :P_FIXED + t]) for t in range(STEPS + 1)]
        want = [list(recompute_past(sess, seqs[:, :P_FIXED + t], None if mask is None else mask[:, :P_FIXED + t], kvh))
                for t in range(STEPS + 1)]
    return got, want, prefixes


def _semantics(case: Case, w: Weights, prefixes: list[list[np.ndarray]], s: float, b: float) -> list[list[np.ndarray]]:
    kind = case.kw["kind"]
    out = []
    for t, row in enumerate(prefixes):
        if kind in ("ms", "past"):
            keep = (LEFT_PAD[:, :P_FIXED + t].astype(bool) if kind == "ms" or case.kw.get("mask") else None)
            ref = M.reference_logits(w, np.stack(row), s, b, keep=keep, bias=kind == "ms")[:, -1]
            out.append(list(ref))
        else:
            out.append([M.reference_logits(w, x[None], s, b, window=case.kw.get("window", -1), rotary=case.kw.get("rotary", False),
                                           fp16=case.name.endswith("fp16"))[0, -1] for x in row])
    return out


def _step_diffs(got: list[np.ndarray], want: list[list[np.ndarray]]) -> list[float]:
    return [float(np.abs(g - np.stack(w)).max()) for g, w in zip(got, want)]


@pytest.fixture(scope="module")
def seqs() -> np.ndarray:
    return _tokens(2, max(LENS + [P_FIXED]) + STEPS + 1)


def prefill_feeds(case: Case, seqs: np.ndarray) -> dict[str, np.ndarray]:
    """Validation inputs for ``rewrite``: new tokens over a random cache, so the check covers past keys."""
    kvh, rng = case.kv_heads, np.random.default_rng(3)
    kind, p, s = case.kw["kind"], 4, 2
    dt = np.float16 if case.name.endswith("fp16") else np.float32
    cache = lambda: rng.standard_normal((2, kvh, p, D)).astype(dt)  # noqa: E731
    if kind == "gqa":  # one token per entry: onnxruntime takes several new tokens over a cache only at batch 1
        s = 1
        return {"input_ids": seqs[:, :s], "past_key": cache(), "past_value": cache(),
                "seqlens_k": np.array([p + s - 1, p + s - 2], np.int32), "total_sequence_length": np.array(p + s, np.int32)}
    if kind == "ms":
        return {"input_ids": seqs[:, :s], "attention_mask": LEFT_PAD[:, :p + s],
                "past": rng.standard_normal((2, 2, H, p, D)).astype(np.float32)}
    if kind == "past":
        f = {"input_ids": seqs[:, :s], "past_key": cache(), "past_value": cache()}
        return {**f, "attention_mask": LEFT_PAD[:, :p + s].astype(bool)} if case.kw.get("mask") else f
    z = rng.standard_normal((2, kvh, MAX_LEN, D)).astype(np.float32)
    return _nonpad_feeds(seqs[:, :s], z, z.copy(), np.array([p, p - 1]), np.array([p + s, p + s - 1]))


def rewrite_case(case: Case, tmp: Path, seqs: np.ndarray) -> tuple[Weights, Path, Path, object]:
    w = Weights(seed=1, kv_heads=case.kv_heads)
    src, dst = tmp / f"{case.name}.onnx", tmp / f"{case.name}.ssmax.onnx"
    onnx.save(case.build(w), src)
    res = aonnx.rewrite(src, dst, to="ssmax", s=S_SSMAX, bias=B_SSMAX, inputs=prefill_feeds(case, seqs))
    return w, src, dst, res


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_decode_loop_equals_full_recompute(case: Case, tmp_path: Path, seqs: np.ndarray) -> None:
    w, src, dst, res = rewrite_case(case, tmp_path, seqs)
    assert len(res.rewritten) == 1 and res.self_test.passed, res.left
    # the original's own loop is consistent (so a difference below is the rewrite's)
    tol = case.kw.get("tol", TOL)
    got0, want0, _ = _decode(case, src, seqs)
    assert max(_step_diffs(got0, want0)) < tol
    got, want, prefixes = _decode(case, dst, seqs)
    diffs = _step_diffs(got, want)
    assert max(diffs) < tol, f"decode vs recompute per step: {diffs}"
    sem = _step_diffs(got, _semantics(case, w, prefixes, S_SSMAX, B_SSMAX))
    assert max(sem) < tol, f"decode vs semantics per step: {sem}"
    # SSMax changed the model: the same loop's logits moved away from the original's
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, got0)) > 1e-2
    assert _semantics(case, w, prefixes[:1], 0.0, 1.0)[0][0] == pytest.approx(want0[0][0], abs=tol)


@pytest.mark.parametrize("mask_rank", [1, 2])
def test_ms_attention_without_cache_equals_semantics(mask_rank: int, tmp_path: Path, seqs: np.ndarray) -> None:
    """BERT-style ``com.microsoft.Attention`` (no past, bidirectional), right padding as ``[B]`` key lengths or a
    ``[B, T]`` key mask: decomposed, every row's ``n`` is its entry's number of real keys."""
    w = Weights(seed=2, kv_heads=H)
    src, dst = tmp_path / "bert.onnx", tmp_path / "bert.ssmax.onnx"
    onnx.save(M.ms_attention_model(w, past=False, mask_rank=mask_rank), src)
    lens = np.array([6, 4], np.int32)
    keep = np.arange(6)[None] < lens[:, None]
    feeds = {"input_ids": seqs[:, :6], "attention_mask": lens if mask_rank == 1 else keep.astype(np.int32)}
    res = aonnx.rewrite(src, dst, to="ssmax", s=S_SSMAX, bias=B_SSMAX, inputs=feeds)
    assert len(res.rewritten) == 1 and res.self_test.passed, res.left
    got = _session(dst).run(None, feeds)[0]
    want = M.reference_logits(w, seqs[:, :6], S_SSMAX, B_SSMAX, keep=keep, bias=True, causal=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=TOL)
    assert np.abs(got - _session(src).run(None, feeds)[0]).max() > 1e-2


def test_gqa_chunked_prefill_equals_full_recompute(tmp_path: Path, seqs: np.ndarray) -> None:
    """A later prompt chunk (several new tokens over a cache, batch 1): row ``i`` of the chunk sits at
    ``seqlens_k + 1 - S + i``, so each row's ``n`` grows along the chunk from the cache's length."""
    case = CASES[0]
    w, _, dst, _ = rewrite_case(case, tmp_path, seqs)
    sess, ids = _session(dst), seqs[:1, :7]
    first = {"input_ids": ids[:, :4], "past_key": _empty(1, KH), "past_value": _empty(1, KH),
             "seqlens_k": np.array([3], np.int32), "total_sequence_length": np.array(4, np.int32)}
    _, pk, pv = sess.run(None, first)
    chunk = {"input_ids": ids[:, 4:], "past_key": pk, "past_value": pv, "seqlens_k": np.array([6], np.int32),
             "total_sequence_length": np.array(7, np.int32)}
    got = sess.run(None, chunk)[0][0]
    full = {"input_ids": ids, "past_key": _empty(1, KH), "past_value": _empty(1, KH),
            "seqlens_k": np.array([6], np.int32), "total_sequence_length": np.array(7, np.int32)}
    np.testing.assert_allclose(got, sess.run(None, full)[0][0, 4:], atol=TOL, rtol=1e-4)
    np.testing.assert_allclose(got, M.reference_logits(w, ids, S_SSMAX, B_SSMAX)[0, 4:], atol=TOL, rtol=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("gqa", "ms_attention", "attention24_past_mask")], ids=repr)
def test_generated_inputs_are_a_first_prompt(case: Case, tmp_path: Path) -> None:
    """Without ``inputs``, validation generates an empty cache and lengths that agree with it (random lengths
    describe no state of a generation loop, and onnxruntime refuses them), so the rewrite runs as it is."""
    from attnpass.validate import make_inputs

    src = tmp_path / f"{case.name}.onnx"
    onnx.save(case.build(Weights(seed=1, kv_heads=case.kv_heads)), src)
    feeds = make_inputs(src, seq=6)
    past = [v for k, v in feeds.items() if k.startswith("past")]
    assert past and all(0 in v.shape for v in past)
    if case.kw["kind"] == "gqa":
        assert feeds["seqlens_k"].tolist() == [5, 5] and int(feeds["total_sequence_length"]) == 6
    res = aonnx.rewrite(src, tmp_path / "out.onnx", to="ssmax", s=0.5)
    assert len(res.rewritten) == 1 and res.self_test.passed


def _with_attr(model: onnx.ModelProto, op: str, **attrs) -> onnx.ModelProto:
    node = next(n for n in model.graph.node if n.op_type == op)
    node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in attrs.items())
    return model


@pytest.mark.parametrize("name,build,why", [
    ("gqa_softcap", lambda w: _with_attr(M.gqa_model(w), "GroupQueryAttention", softcap=30.0), "softcap"),
    ("gqa_smooth", lambda w: _with_attr(M.gqa_model(w), "GroupQueryAttention", smooth_softmax=1), "smooth softmax"),
    ("msa_rotary", lambda w: _with_attr(M.ms_attention_model(w), "Attention", do_rotary=1), "do_rotary"),
    ("msa_shared_buffer", lambda w: _with_attr(M.ms_attention_model(w), "Attention", past_present_share_buffer=1), "sharing"),
    ("msa_mask_1d_unknown", lambda w: M.ms_attention_model(w, past=False, mask_rank=1), None),
], ids=lambda x: x if isinstance(x, str) else "")
def test_what_ssmax_leaves_names_the_reason(name: str, build, why: str | None, tmp_path: Path) -> None:
    """Op variants whose Q the factor cannot reach as the op defines it are left, with the reason in the report."""
    w = Weights(seed=1, kv_heads=H if name.startswith("msa") else KH)
    model = build(w)
    if why is None:  # a 1-D mask_index whose length is not the batch's: [2B] end/start positions are possible
        mask = next(i for i in model.graph.input if i.name == "attention_mask")
        mask.type.tensor_type.shape.dim[0].dim_param = "two_batch"
        why = "[2B]"
    src = tmp_path / f"{name}.onnx"
    onnx.save(model, src)
    site = aonnx.find(src)[0]
    assert site.ssmax_blocker is not None and why in site.ssmax_blocker


def decode_table() -> list[str]:
    """Per case and step, the max abs difference of the SSMax decode logits from the full recompute and from
    ``semantics`` (``python -m tests.test_onnx_kvcache`` prints it; the tests assert the same numbers)."""
    import tempfile

    seqs = _tokens(2, max(LENS + [P_FIXED]) + STEPS + 1)
    lines = [f"{'case':24s} step: {' '.join(f'{t:>8d}' for t in range(STEPS + 1))}"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as d:
            w, src, dst, _ = rewrite_case(case, Path(d), seqs)
            got, want, prefixes = _decode(case, dst, seqs)
            got0, _, _ = _decode(case, src, seqs)
            rec = _step_diffs(got, want)
            sem = _step_diffs(got, _semantics(case, w, prefixes, S_SSMAX, B_SSMAX))
            moved = max(float(np.abs(a - b).max()) for a, b in zip(got, got0))
        lines.append(f"{case.name:24s} recompute {' '.join(f'{x:8.1e}' for x in rec)}")
        lines.append(f"{'':24s} semantics {' '.join(f'{x:8.1e}' for x in sem)}   (SSMax vs original: {moved:.2f})")
    return lines


if __name__ == "__main__":
    print("\n".join(decode_table()))
