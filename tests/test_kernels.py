"""The project's CPU GEMM kernel against torch's F.linear, and the fallback when it is off."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from capabilities import needs  # noqa: E402

from hpcserve.kernels import build, cpu_gemm  # noqa: E402

# Not for this platform (not x86-64 with AVX2/FMA, or HPCSERVE_CPU_KERNELS=0): skip. For it but not
# built (no C compiler, a compile error): skip here, fail in CI.
pytestmark = [
    pytest.mark.skipif(build._why_not() is not None, reason=f"CPU kernels not for this machine: {build._why_not()}"),
    needs(cpu_gemm.available()[0], reason=f"CPU GEMM kernel unavailable: {cpu_gemm.available()[1]}"),
]


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


def test_engine_falls_back_when_the_kernels_are_off(tiny_model_factory, monkeypatch):
    """With neither the GEMM nor the fused ops, the engine runs the torch reference path
    (oneDNN/F.linear, TorchAttention) and produces the same greedy tokens."""
    from hpcserve import LLM, SamplingParams

    path = tiny_model_factory("qwen2", tie=False)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10], [42, 3]]
    with_kernel = [o.token_ids for o in LLM(str(path)).generate(prompts, params)]
    monkeypatch.setattr(cpu_gemm, "_lib", None)
    monkeypatch.setattr(cpu_gemm, "_why_not", "disabled for this test")
    from hpcserve.kernels import cpu_ops as ops_module

    monkeypatch.setattr(ops_module, "_setup", lambda: None)
    llm = LLM(str(path))
    model = llm.engine.runner.model
    assert not isinstance(model.layers[0].qkv, cpu_gemm.PackedLinear)
    assert model.ops is None and model.attn.name == "torch"
    assert [o.token_ids for o in llm.generate(prompts, params)] == with_kernel


# ---------------------------------------------------------------- fused ops
from hpcserve.kernels import cpu_ops  # noqa: E402


def test_add_rms_norm_matches_torch():
    g = torch.Generator().manual_seed(1)
    for rows, h in ((1, 8), (7, 64), (33, 576)):
        x, d, w = torch.randn(rows, h, generator=g), torch.randn(rows, h, generator=g), torch.randn(h, generator=g)
        x2 = x.clone()
        out = cpu_ops.add_rms_norm(x2, d, w, 1e-5)
        torch.testing.assert_close(x2, x + d)
        torch.testing.assert_close(out, F.rms_norm(x + d, (h,), w, 1e-5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cpu_ops.add_rms_norm(x.clone(), None, w, 1e-5), F.rms_norm(x, (h,), w, 1e-5), rtol=1e-5, atol=1e-5)


def test_rope_in_place_matches_rotate_half():
    g = torch.Generator().manual_seed(2)
    d, heads, extra = 16, 3, 2
    cos, sin = torch.randn(40, d, generator=g), torch.randn(40, d, generator=g)
    pos = torch.tensor([0, 5, 39, 5, 12])
    x = torch.randn(5, heads + extra, d, generator=g)
    got = x.clone()
    cpu_ops.rope_(got, heads, cos, sin, pos)
    r = x[:, :heads]
    rotated = torch.cat([r[..., d // 2 :], r[..., : d // 2]], dim=-1)
    want = x.clone()
    want[:, :heads] = r * cos[pos].unsqueeze(1) + rotated * sin[pos].unsqueeze(1)
    torch.testing.assert_close(got, want)
    assert torch.equal(got[:, heads:], x[:, heads:])  # heads past `heads` untouched


@pytest.mark.parametrize("kv_heads,group,window,d", [(1, 1, None, 8), (2, 3, None, 12), (4, 2, 5, 8), (3, 3, 1, 20)])
def test_paged_decode_attention_matches_gathered_softmax(kv_heads, group, window, d):
    g = torch.Generator().manual_seed(kv_heads * 10 + group)
    bs, nb = 4, 16
    kc, vc = torch.randn(nb, bs, kv_heads, d, generator=g), torch.randn(nb, bs, kv_heads, d, generator=g)
    lens = torch.tensor([1, 6, 13, 4])
    tables = torch.tensor([[2, 0, 0, 0], [5, 9, 0, 0], [1, 3, 7, 11], [15, 0, 0, 0]])
    q = torch.randn(4, kv_heads * group, d, generator=g)
    got = cpu_ops.paged_decode_attention(q, kc, vc, tables, lens, 0.3, window)
    for s in range(4):
        n = int(lens[s])
        lo = max(0, n - window) if window else 0
        kk = kc[tables[s]].reshape(-1, kv_heads, d)[lo:n]
        vv = vc[tables[s]].reshape(-1, kv_heads, d)[lo:n]
        for h in range(kv_heads * group):
            want = torch.softmax(kk[:, h // group] @ q[s, h] * 0.3, 0) @ vv[:, h // group]
            torch.testing.assert_close(got[s, h], want, rtol=1e-5, atol=1e-5)


def test_silu_mul_matches_torch():
    g = torch.Generator().manual_seed(3)
    for rows, inter in ((1, 5), (9, 64), (33, 1536)):
        gu = torch.randn(rows, 2 * inter, generator=g) * 6  # wide range: exp clamps must not matter
        gate, up = gu.chunk(2, dim=-1)
        torch.testing.assert_close(cpu_ops.silu_mul(gu), F.silu(gate) * up, rtol=1e-5, atol=1e-5)
    big = torch.tensor([[-200.0, 200.0, 0.0, 1.0]])  # gate [-200, 200], up [0, 1]
    torch.testing.assert_close(cpu_ops.silu_mul(big), torch.tensor([[0.0, 200.0]]))


def test_ops_work_without_calling_available_first():
    import subprocess
    import sys

    code = ("import torch; from hpcserve.kernels import cpu_ops; "
            "print(cpu_ops.silu_mul(torch.zeros(1, 4)).tolist())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[[0.0, 0.0]]"


def test_paged_decode_attention_long_context_uses_heap_scores():
    """heads x context above the kernel's stack buffer (8192 scores) takes the malloc path."""
    g = torch.Generator().manual_seed(7)
    kv_heads, group, d, bs = 2, 2, 8, 16
    n = 2100  # 4 heads x 2100 = 8400 scores
    blocks = -(-n // bs)
    kc, vc = torch.randn(blocks + 1, bs, kv_heads, d, generator=g), torch.randn(blocks + 1, bs, kv_heads, d, generator=g)
    table = torch.arange(1, blocks + 1).unsqueeze(0)
    q = torch.randn(1, kv_heads * group, d, generator=g)
    got = cpu_ops.paged_decode_attention(q, kc, vc, table, torch.tensor([n]), 0.5)
    kk, vv = kc[1:].reshape(-1, kv_heads, d)[:n], vc[1:].reshape(-1, kv_heads, d)[:n]
    for h in range(kv_heads * group):
        want = torch.softmax(kk[:, h // group] @ q[0, h] * 0.5, 0) @ vv[:, h // group]
        torch.testing.assert_close(got[0, h], want, rtol=1e-5, atol=1e-5)
