"""The examples in smoke mode (tiny sizes): they run, print, and write their figures."""

from __future__ import annotations

from examples import attention_fading, compile_backend, key_retrieval


def test_key_retrieval_smoke(tmp_path) -> None:
    table = key_retrieval.main(["--smoke", "--out", str(tmp_path)])
    assert set(table) == {"softmax", "ssmax", "converted"}
    assert all(0.0 <= acc <= 1.0 for per in table.values() for acc in per.values())
    assert (tmp_path / "key_retrieval_smoke.png").stat().st_size > 1000


def test_attention_fading_smoke(tmp_path, capsys) -> None:
    attention_fading.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "attention_fading_smoke.png").stat().st_size > 1000
    assert "max weight" in capsys.readouterr().out


def test_synthetic_fading_is_what_the_paper_shows() -> None:
    """Softmax's weight on the leading logit decays with n; SSMax (s=0.43) keeps more of it at large n."""
    lengths = [16, 4096]
    res = attention_fading.synthetic(lengths, [0.43])
    soft, ss = res["softmax"]["max"], res["SSMax s=0.43"]["max"]
    assert soft[1] < soft[0] / 10
    assert ss[1] > 5 * soft[1]


def test_compile_backend_smoke(capsys) -> None:
    compile_backend.main(["--smoke"])
    out = capsys.readouterr().out
    assert "2 sites rewritten" in out and "training step" in out


def test_onnx_deploy_smoke() -> None:
    from examples import onnx_deploy

    results = onnx_deploy.main(["--smoke"])
    assert set(results) == {"original", "fused", "ssmax"}
    assert all(r["same_as_torch"] for r in results.values())


def test_hf_ssmax_setting_example() -> None:
    from examples import hf_ssmax_setting

    out = hf_ssmax_setting.main([])
    assert out["restored"] == 0.0 and out["decode_diff"] < 1e-4
    assert sum("Llama 4 attention temperature tuning (attn_scale=0.1, floor_scale=8192)" in x for x in out["relatives"]) == 2
