"""KL divergence of the real SmolLM2-135M in bfloat16 from the same weights in float32."""

import pytest

from lmeval.kl_run import KLConfig, run_kl


@pytest.mark.slow
def test_smollm2_bfloat16_drifts_slightly():
    results = run_kl(
        KLConfig(
            model="smollm2-135m",
            dtype="bfloat16",
            reference="smollm2-135m",
            reference_dtype="float32",
            task="python-docs",
            limit=1,
            window_size=256,
            progress=False,
        )
    )
    metrics = results["metrics"]
    for name in ("kl_model_ref", "kl_ref_model"):
        assert 0 < metrics[name]["mean"] < 0.05, name
        assert metrics[name]["p99"] > metrics[name]["median"], name
    assert 0.9 < metrics["top1_agreement"] < 1.0
    assert results["model"]["dtype"] == "bfloat16"
    assert results["reference"]["dtype"] == "float32"
