"""The platform policy: built from the running backend once, named explicitly otherwise."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_jax import backend
from pali_jax.backend import Layout, Policy


def test_host_policy_names_this_process_platform():
    host = Policy.host()
    assert host is Policy.host()  # built once
    assert host.platform == {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
    assert host.cpu_features == (backend.cpu_features() if host.platform == "cpu" else frozenset())


def test_cpu_features_are_the_tracked_flags_of_cpuinfo(tmp_path, monkeypatch):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_int8\n")
    monkeypatch.setattr(backend, "_CPUINFO", info)
    assert backend.cpu_features.__wrapped__() == {"avx2", "avx512f", "amx_bf16", "amx_int8"}
    assert backend.cpu_model() == "Some Xeon"
    assert Policy("cpu", {"avx2", "sse2"}).cpu_features == {"avx2"}


def test_choices_follow_the_named_platform_only():
    bf16 = jnp.bfloat16
    assert Policy("cpu").inference_layout(bf16) == Layout(stacked=False, out_first=True, int4_bytes=True)
    assert Policy("cuda").inference_layout(bf16) == Layout(stacked=False, out_first=False)
    assert Policy("cpu").matmul_form(bf16, 1, True) == "left_zero"
    assert {Policy(p).matmul_form(bf16, 1, True) for p in ("cuda", "rocm", "tpu", None)} == {"dot_general"}
    assert Policy("cuda").attention_kernel(bf16, None) == "cudnn"
    assert Policy("cuda").attention_kernel(bf16, 50.0) == Policy("cuda").attention_kernel(jnp.float32, None) == "einsum"
    assert Policy("rocm").attention_kernel(bf16, None) == "einsum"
    # YNNPACK's consistent arithmetic (except on AMX, whose bf16 GEMM it gives up); no float32 copy of
    # bf16 weights hoisted out of a loop
    assert Policy("cpu").compiler_options() == {"xla_cpu_enable_platform_dependent_math": False,
                                                "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    amx = Policy("cpu", {"avx512f", "amx_tile", "amx_bf16"}).compiler_options()
    assert amx == {**Policy("cpu").compiler_options(), "xla_cpu_enable_platform_dependent_math": True}
    assert Policy("tpu").compiler_options() is None and Policy("cuda").compiler_options() is None
    with pytest.raises(ValueError, match="unknown platform"):
        Policy("gpu")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("out_first", [True, False])
@pytest.mark.parametrize("rows", [1, 5])
def test_tiled_quantized_product_equals_dequantize_then_dot(scheme, out_first, rows):
    """The CPU policy's tiled product of a quantised weight gives the numbers of the plain form
    (dequantise, then one dot) within float32 rounding: tiles that do not divide the output
    channels, grouped int4 scales, both stored layouts, x over two contracted axes."""
    from pali_jax import quantize
    from pali_jax.quantize import Quantization

    rng = np.random.default_rng(0)
    ins, outs = (4, 32), (2, 13)  # [N=4, H=32] contracted (attn_vec_einsum-like), 26 output channels
    shape = (*outs, *ins) if out_first else (*ins, *outs)
    contracted = (2, 3) if out_first else (0, 1)
    w = rng.standard_normal(shape).astype(np.float32)
    node = quantize.quantize(w, Quantization(scheme, group_size=16), contracted)
    x = jnp.asarray(rng.standard_normal((rows, 3, *ins)), jnp.float32)
    cpu = Policy("cpu")
    int8 = jnp.int8
    assert cpu.quantized_form(jnp.bfloat16, 1, True, int8) == cpu.quantized_form(jnp.float32, 64, True, int8) == "tiled_f32"
    assert cpu.quantized_form(jnp.bfloat16, 64, True, int8) == "tiled"
    assert Policy("cuda").quantized_form(jnp.float32, rows, True, int8) == "dequantize"
    assert Policy().quantized_form(jnp.bfloat16, 1, True, int8) == "dequantize"
    assert cpu.tile_rows(128, jnp.float32) >= 26  # the test below narrows it to cut the channels unevenly
    narrow = Policy("cpu", tile_bytes=4 * 128 * 4)  # 6 tiles of 4 output channels and one of 2
    assert narrow.tile_rows(128, jnp.float32) == 4 and narrow.tile_rows(128, jnp.bfloat16) == 8
    tiled = backend.project(x, node, 2, out_first, narrow)
    plain = backend.project(x, quantize.dequantize(node, jnp.float32), 2, out_first, Policy())
    assert tiled.shape == plain.shape == (rows, 3, *outs) and tiled.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(plain), rtol=1e-5, atol=1e-5)
    x16 = x.astype(jnp.bfloat16)
    whole = backend.project(x16, node, 2, out_first, cpu)  # one tile; bf16 rows, float32 arithmetic
    plain16 = backend.project(x16.astype(jnp.float32), quantize.dequantize(node, jnp.float32), 2, out_first, Policy())
    assert whole.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(whole, np.float32), np.asarray(plain16), rtol=2 ** -8, atol=1e-6)
    # many bf16 rows: bf16 tiles through the bf16 product, as the dequantise-then-dot form rounds them
    x16 = jnp.asarray(rng.standard_normal((4, 5, *ins)), jnp.bfloat16)  # 20 rows
    tiled16 = backend.project(x16, node, 2, out_first, narrow)
    plain16 = backend.project(x16, quantize.dequantize(node, jnp.bfloat16), 2, out_first, cpu)
    assert narrow.quantized_form(jnp.bfloat16, 20, out_first, jnp.int8) == "tiled" and tiled16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(tiled16, np.float32), np.asarray(plain16, np.float32), rtol=2 ** -7, atol=1e-6)


def test_a_batch_prefill_multiplies_a_wide_bfloat16_weight_tile_by_tile():
    """On CPU a batch's prefill (from _WIDE_TILED_ROWS bf16 rows) times an output-first weight
    contracting at least `wide_input` inputs runs tile by tile (`tiled`), with the numbers of the
    one product it replaces (each output rounded once to bf16); fewer rows, narrower weights,
    float32, the checkpoint layout, other platforms and `wide_input=None` keep their forms."""
    bf16, rows = jnp.bfloat16, backend._WIDE_TILED_ROWS
    cpu = Policy("cpu", tile_bytes=4 * 256 * 2, wide_input=256)  # bf16 tiles of 4 output channels
    assert cpu.matmul_form(bf16, rows, True, 256) == "tiled"
    assert cpu.matmul_form(bf16, rows, True, 128) == cpu.matmul_form(bf16, rows - 1, True, 256) == "dot_general"
    assert cpu.matmul_form(bf16, 2, True, 256) == "left_zero"
    assert cpu.matmul_form(jnp.float32, rows, True, 256) == "dot_general"
    assert cpu.matmul_form(bf16, rows, False, 256) == "dot"
    assert Policy("cpu", wide_input=None).matmul_form(bf16, rows, True, 1 << 20) == "dot_general"
    assert {Policy(p).matmul_form(bf16, rows, True, 1 << 20) for p in ("cuda", "rocm", "tpu", None)} == {"dot_general"}
    assert Policy("cpu").matmul_form(bf16, 8 * 266, True, 16384) == "tiled"  # 8 prompts, PaliGemma 1's down projection
    assert Policy("cpu").matmul_form(bf16, 266, True, 16384) == "dot_general"  # one prompt
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((2, 13, 256)), bf16)  # 26 output channels: 6 tiles of 4, one of 2
    x = jnp.asarray(rng.standard_normal((4, rows // 4, 256)), bf16)
    got = backend.project(x, w, 1, True, cpu)
    want = backend.project(x, w, 1, True, Policy("cpu", wide_input=None))
    exact = np.asarray(x, np.float64).reshape(rows, 256) @ np.asarray(w, np.float64).reshape(26, 256).T
    assert got.shape == want.shape == (4, rows // 4, 2, 13) and got.dtype == bf16
    np.testing.assert_allclose(np.asarray(got, np.float64).reshape(rows, 26), exact, rtol=2 ** -8, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("out_first", [True, False])
def test_tiled_product_of_a_bfloat16_weight_is_its_float32_product(out_first):
    """`_tiled` on a plain bf16 weight (benchmarks/cpu_matmul.py's `tiled_f32` candidate) converts
    each tile exactly: the float32 product of the converted weight, uneven tiles included."""
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((26, 128) if out_first else (128, 26)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    narrow = Policy("cpu", tile_bytes=4 * 128 * 4)  # tiles of 4 output channels, the last of 2
    got = backend._tiled(x, w, 128, out_first, narrow.tile_rows(128, jnp.float32))
    w32 = np.asarray(w, np.float32)
    want = np.asarray(x) @ (w32.T if out_first else w32)
    assert got.shape == (3, 26) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tiled_program_never_holds_the_whole_dequantised_weight(dtype):
    """What the tiled form is for: XLA:CPU's compiled program dequantises tile-sized buffers only,
    where the dequantise-then-dot form writes the whole float weight."""
    from pali_jax import quantize
    from pali_jax.quantize import Quantization

    w = np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)  # [N, K] output-first
    node = quantize.quantize(w, Quantization("int8"), (1,))
    x = jnp.ones((1, 512), dtype)

    def buffers(policy) -> str:
        return jax.jit(lambda x, node: backend.project(x, node, 1, True, policy)).lower(x, node).compile().as_text()

    tiled = buffers(Policy("cpu", tile_bytes=8 * 512 * 4))  # float32 tiles of 8 channels
    assert "f32[8,512]" in tiled and not re.search(r"(f32|bf16)\[64,512\]", tiled)
    assert re.search(r"(f32|bf16)\[64,512\]", buffers(Policy()))
