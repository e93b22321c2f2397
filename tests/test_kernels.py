"""The project's CPU GEMM kernel against torch's F.linear, and the fallback when it is off."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from hpcserve.kernels import cpu_gemm  # noqa: E402

pytestmark = pytest.mark.skipif(not cpu_gemm.available()[0], reason=f"CPU GEMM kernel unavailable: {cpu_gemm.available()[1]}")


@pytest.mark.parametrize("m", [0, 1, 2, 3, 4, 5, 31, 32, 33, 64, 65, 129, 300])
@pytest.mark.parametrize("n,k", [(1, 1), (24, 8), (25, 7), (47, 33), (96, 64), (200, 130)])
def test_packed_linear_matches_f_linear(m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    w, b, x = (torch.randn(*s, generator=g) for s in ((n, k), (n,), (m, k)))
    for bias in (None, b):
        got = cpu_gemm.PackedLinear(w, bias)(x)
        want = F.linear(x, w, bias)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k)


def test_row_strided_input_and_bad_input():
    g = torch.Generator().manual_seed(0)
    both = torch.randn(9, 2 * 40, generator=g)
    x = both[:, :40]  # rows 80 floats apart, like the gate half of gate|up
    assert x.stride() == (80, 1)
    w = torch.randn(30, 40, generator=g)
    torch.testing.assert_close(cpu_gemm.PackedLinear(w)(x), F.linear(x, w), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError):
        cpu_gemm.PackedLinear(w)(torch.randn(3, 41))
    with pytest.raises(ValueError):
        cpu_gemm.PackedLinear(w.double())


def test_engine_falls_back_when_the_kernel_is_off(tiny_model_factory, monkeypatch):
    from hpcserve import LLM, SamplingParams

    path = tiny_model_factory("qwen2", tie=False)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10], [42, 3]]
    with_kernel = [o.token_ids for o in LLM(str(path)).generate(prompts, params)]
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    monkeypatch.setattr(cpu_gemm, "_why_not", "disabled for this test")
    llm = LLM(str(path))
    assert not isinstance(llm.engine.runner.model.layers[0].qkv, cpu_gemm.PackedLinear)
    assert [o.token_ids for o in llm.generate(prompts, params)] == with_kernel
