"""The CPU kernels (pali_jax/cpu_kernels.cc: decoding's matrix-vector products, prefill's AMX
GEMMs): built by the install, exact to float32 rounding, picked by the policy only where they can
run, and invisible in the model's answers."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pali_jax import backend, cpu_kernels, quantize
from pali_jax.backend import Policy
from pali_jax.demo import shapes
from pali_jax.pretrained import PaliGemma
from pali_jax.quantize import Quantization

DEMO = Path(__file__).resolve().parents[1] / "pali_jax" / "assets" / "demo" / "model"
X86 = platform.machine().lower() in ("x86_64", "amd64")
HOST = Policy.host().cpu_features  # AMX's flags only where this process was granted the tiles
KERNELS = Policy("cpu", HOST, cpu_kernels=True)
NO_KERNELS = Policy("cpu", HOST, cpu_kernels=False)
CAN_BF16 = backend._BF16_KERNEL_FLAGS <= HOST
CAN_QUANT = backend._QUANT_KERNEL_FLAGS <= HOST
CAN_AMX = backend._AMX_FLAGS <= HOST and cpu_kernels.amx()


def test_the_install_built_and_loads_the_kernels():
    """On x86-64 the install compiles them (setup.py); a silent build failure would leave every CPU
    decode on XLA's slower products, so it fails here instead."""
    if not X86:  # setup.py builds nothing there
        assert cpu_kernels.library_path() is None and not cpu_kernels.load()
        return
    assert cpu_kernels.library_path() is not None, "pip install did not build pali_jax/_cpu_kernels (see setup.py)"
    switched_off = os.environ.get(cpu_kernels.DISABLE_ENV) == "0"
    assert cpu_kernels.load() != switched_off
    assert Policy.host().cpu_kernels != switched_off


def test_the_environment_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "0")
    assert cpu_kernels._library.__wrapped__() is None  # the uncached body: what a fresh process would decide


def test_policy_picks_a_kernel_only_where_it_runs():
    bf16, int8 = jnp.bfloat16, jnp.int8
    every = backend._BF16_KERNEL_FLAGS | backend._QUANT_KERNEL_FLAGS
    on = Policy("cpu", every, cpu_kernels=True)
    assert on.matmul_form(bf16, 1, True) == on.matmul_form(bf16, backend._BF16_KERNEL_ROWS - 1, True) == "kernel"
    assert on.matmul_form(bf16, backend._BF16_KERNEL_ROWS, True) == "dot_general"
    assert on.matmul_form(jnp.float32, 1, True) == "dot_general"  # float32 products already stream at the floor
    assert on.matmul_form(bf16, 1, False) == "dot_pad"  # training's checkpoint layout: never a kernel
    assert on.quantized_form(bf16, backend._QUANT_KERNEL_ROWS - 1, True, int8) == "kernel"
    assert on.quantized_form(bf16, backend._QUANT_KERNEL_ROWS, True, int8) == "tiled"
    assert on.quantized_form(bf16, 1, True, jnp.int4) == "tiled_f32"  # int4 values not held one per byte
    assert on.quantized_form(bf16, 1, False, int8) == "tiled_f32"
    # the kernels need their instruction sets, and the library loaded in this process
    assert Policy("cpu", every - {"avx512_bf16"}, cpu_kernels=True).matmul_form(bf16, 1, True) == "left_zero"
    assert Policy("cpu", every - {"avx512bw"}, cpu_kernels=True).quantized_form(bf16, 1, True, int8) == "tiled_f32"
    assert Policy("cpu", every).matmul_form(bf16, 1, True) == "left_zero"
    assert Policy("cuda", every, cpu_kernels=True).quantized_form(bf16, 1, True, int8) == "dequantize"
    # nibble-packed int4 (uint8): the kernel at any row count, where the bf16 kernel runs; else dequantised
    assert on.quantized_form(bf16, 1, True, jnp.uint8) == on.quantized_form(bf16, 512, True, jnp.uint8) == "int4_kernel"
    assert on.quantized_form(jnp.float32, 1, True, jnp.uint8) == "dequantize"
    assert Policy("cpu", every - {"avx512_bf16"}, cpu_kernels=True).quantized_form(bf16, 1, True, jnp.uint8) == "dequantize"
    assert on.inference_layout(bf16).int4_packed and not on.inference_layout(jnp.float32).int4_packed
    assert not Policy("cpu", every).inference_layout(bf16).int4_packed
    assert not Policy("cuda", every, cpu_kernels=True).inference_layout(bf16).int4_packed


def test_policy_multiplies_on_amx_only_where_the_tiles_fit():
    bf16, int8, rows, rows8 = jnp.bfloat16, jnp.int8, backend._AMX_ROWS, backend._AMX_INT8_ROWS
    amx = Policy("cpu", backend._AMX_FLAGS | backend._QUANT_KERNEL_FLAGS, cpu_kernels=True)
    assert amx.matmul_form(bf16, rows, True, 2048, 16384) == amx.matmul_form(bf16, 2128, True, 16384, 2048) == "amx"
    assert amx.matmul_form(bf16, rows - 1, True, 2048, 16384) == "kernel"  # one row: the matrix-vector kernel
    assert amx.matmul_form(bf16, rows, True, 2048, 8) == amx.matmul_form(bf16, rows, True, 2047, 16) == "kernel"
    assert amx.matmul_form(jnp.float32, rows, True, 2048, 16) == "dot_general"
    # inputs first (SigLIP's, the checkpoint's layout): paired per call, from the same rows
    assert amx.matmul_form(bf16, rows, False, 1152, 4304) == amx.quantized_form(bf16, rows8, False, int8, 1152, 4304) == "amx"
    assert amx.matmul_form(bf16, rows - 1, False, 2048, 16) == "dot_pad"
    assert amx.quantized_form(bf16, rows8 - 1, False, int8, 1152, 4304) == "tiled_f32"
    assert amx.matmul_form(bf16, rows, False, 2048, 8) == "dot"  # off the tiles
    packed, rows4 = jnp.uint8, backend._AMX_INT4_ROWS  # nibble-packed int4: the int4 kernel below
    assert amx.quantized_form(bf16, rows4, True, packed, 2048, 16, groups=16) == "amx"
    assert amx.quantized_form(bf16, rows4 - 1, True, packed, 2048, 16, groups=16) == "int4_kernel"
    assert amx.quantized_form(bf16, rows8, True, int8, 2048, 16) == "amx"
    assert amx.quantized_form(bf16, rows8 - 1, True, int8, 2048, 16) == "kernel"
    assert amx.quantized_form(bf16, 64, True, int8, 2048, 16, groups=16) == "tiled"  # int4 held in bytes: groups
    assert amx.quantized_form(jnp.float32, 64, True, int8, 2048, 16) == "tiled_f32"
    no_amx = Policy("cpu", backend._BF16_KERNEL_FLAGS | backend._QUANT_KERNEL_FLAGS, cpu_kernels=True)
    assert no_amx.matmul_form(bf16, 266, True, 2048, 16384) == "dot_general"
    assert no_amx.quantized_form(bf16, 266, True, jnp.uint8, 2048, 16, groups=16) == "int4_kernel"
    assert Policy("cpu", backend._AMX_FLAGS).matmul_form(bf16, 266, True, 2048, 16384) == "dot_general"  # no library


def _float32_bound(x64: np.ndarray, w64: np.ndarray) -> np.ndarray:
    """The float32 rounding bound of sums of exact products: K * eps * sum |x w|."""
    return x64.shape[1] * np.finfo(np.float32).eps * (np.abs(x64) @ np.abs(w64).T)


@pytest.mark.skipif(not CAN_BF16, reason="this CPU lacks AVX512-BF16: the policy never calls the kernel (test above)")
@pytest.mark.parametrize("m", [1, 3, 4, 7, 12])
@pytest.mark.parametrize("n, k", [(13, 100), (64, 2048), (5, 31)])
def test_bf16_matvec_is_exact_to_float32_rounding(m, n, k):
    """bf16 products are exact in float32; only the float32 sums round. Shapes off every vector
    width (K not a multiple of 32, N not of the row blocks, M past the 4- and 8-row groups)."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    y = np.asarray(jax.jit(cpu_kernels.bf16_matvec)(x, w), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    assert y.shape == (m, n)
    assert np.all(np.abs(y - x64 @ w64.T) <= _float32_bound(x64, w64))


@pytest.mark.skipif(not CAN_QUANT, reason="this CPU lacks AVX-512: the policy never calls the kernel (test above)")
@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 16), ("int4", 24)])
@pytest.mark.parametrize("m", [1, 2, 5])
def test_quant_matvec_is_the_dequantised_product(scheme, group, m):
    """Against float64 on the dequantised weight: per-channel int8, int4 groups (a group that is
    not a multiple of the 16-lane vector included), odd N."""
    rng = np.random.default_rng(m)
    n, k = 13, 96
    node = quantize.quantize(rng.standard_normal((n, k)).astype(np.float32), Quantization(scheme, group or 128), (1,))
    q, scale = node[quantize.QVALUE].astype(jnp.int8), node[quantize.SCALE].astype(jnp.float32)
    assert scale.shape == ((n, 1) if scheme == "int8" else (n, k // group))
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    y = np.asarray(jax.jit(cpu_kernels.quant_matvec)(x, q, scale), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(quantize.dequantize(node, jnp.float32), np.float64)
    assert np.all(np.abs(y - x64 @ w64.T) <= 2 * _float32_bound(x64, w64))  # the group sums round, then their scaled sum


@pytest.mark.skipif(not CAN_BF16, reason="this CPU lacks AVX512-BF16: the policy never calls the kernel (test above)")
@pytest.mark.parametrize("m", [1, 2, 3, 4, 6, 8, 11, 17])
@pytest.mark.parametrize("n, k, group", [(13, 256, 128), (9, 384, 384), (40, 512, 256)])
def test_int4_matvec_is_the_dequantised_product(m, n, k, group):
    """Nibble-packed int4 against float64 on the dequantised weight: every row-block shape (1 to 8
    rows, and past 8), N off every channel block, one group per row or several."""
    rng = np.random.default_rng(m * 100 + n)
    node = quantize.quantize(rng.standard_normal((n, k)).astype(np.float32), Quantization("int4", group), (1,))
    packed = quantize.pack_int4(node[quantize.QVALUE])
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    y = np.asarray(jax.jit(cpu_kernels.int4_matvec)(x, packed, node[quantize.SCALE]), np.float64)
    x64, w64 = np.asarray(x, np.float64), np.asarray(quantize.dequantize(node, jnp.float32), np.float64)
    assert y.shape == (m, n)
    assert np.all(np.abs(y - x64 @ w64.T) <= 2 * _float32_bound(x64, w64))  # the group sums round, then their scaled sum


@pytest.mark.skipif(not CAN_BF16, reason="this CPU lacks AVX512-BF16: the policy never calls the kernel (test above)")
def test_int4_matvec_refuses_groups_off_the_packing():
    x = jnp.ones((1, 128), jnp.bfloat16)
    with pytest.raises(Exception, match="multiple of 128"):
        jax.block_until_ready(cpu_kernels.int4_matvec(x, jnp.zeros((4, 64), jnp.uint8), jnp.ones((4, 2), jnp.float32)))


@pytest.mark.skipif(not CAN_AMX, reason="this CPU (or its kernel) gives no AMX: the policy never calls the GEMMs")
@pytest.mark.parametrize("m", [1, 17, 530])
@pytest.mark.parametrize("n, k", [(16, 100), (48, 1100), (272, 600)])
@pytest.mark.parametrize("out_first", [True, False])
def test_amx_gemms_are_exact_to_float32_rounding(m, n, k, out_first):
    """bf16, and int8 converted to bf16 exactly, against float64, the weight stored output channels
    first or inputs first: row counts off the 16-row tiles and past a 512-row pass, N an odd number
    of 16-channel tiles and past one thread's 128 channels, K off the 32-input tiles and over
    several 256-input chunks (partial sums carried between them). Both layouts sum in the same
    order: the same bits."""
    rng = np.random.default_rng(m * 1000 + n + k)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)), jnp.bfloat16)
    stored = w if out_first else w.T
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    gemm = jax.jit(cpu_kernels.bf16_gemm, static_argnums=(2, 3))
    y32 = gemm(x, stored, jnp.float32, out_first)
    y = np.asarray(y32, np.float64)
    assert y.shape == (m, n)
    assert np.all(np.abs(y - x64 @ w64.T) <= _float32_bound(x64, w64))
    if not out_first:
        np.testing.assert_array_equal(np.asarray(y32), np.asarray(gemm(x, w, jnp.float32, True)))
    # bf16 out: the same sums, rounded once as XLA rounds them
    y16 = gemm(x, stored, jnp.bfloat16, out_first)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))
    node = quantize.quantize(rng.standard_normal((n, k)).astype(np.float32), Quantization("int8"), (1,))
    q, s = node[quantize.QVALUE], node[quantize.SCALE]  # [N, K], [N, 1]
    int8 = jax.jit(cpu_kernels.int8_gemm, static_argnums=(3, 4))
    y32 = int8(x, q if out_first else q.T, s if out_first else s.T, jnp.float32, out_first)
    y = np.asarray(y32, np.float64)
    q64 = np.asarray(q, np.float64)
    scale = np.asarray(s, np.float64)  # [N, 1]: one product, scaled once
    assert np.all(np.abs(y - (x64 @ q64.T) * scale.T) <= 2 * _float32_bound(x64, q64) * scale.T)
    y16 = int8(x, q if out_first else q.T, s if out_first else s.T, jnp.bfloat16, out_first)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))


@pytest.mark.skipif(not CAN_AMX, reason="this CPU (or its kernel) gives no AMX: the policy never calls the GEMMs")
@pytest.mark.parametrize("m", [1, 17, 530])
@pytest.mark.parametrize("n, k, group", [(16, 128, 128), (48, 384, 128), (272, 1024, 256)])
def test_int4_gemm_is_the_product_with_the_weight_dequantised_to_bf16(m, n, k, group):
    """Nibble-packed int4 on AMX: each weight times its group's scale rounded once to bf16 (the tiled
    form's and the GPU's numerics), then the exact products summed in float32: against float64 on
    that bf16 weight, within float32 rounding; bf16 out is that sum rounded once."""
    rng = np.random.default_rng(m * 1000 + n + k)
    node = quantize.quantize(rng.standard_normal((n, k)).astype(np.float32), Quantization("int4", group), (1,))
    packed, scale = quantize.pack_int4(node[quantize.QVALUE]), node[quantize.SCALE]
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
    gemm = jax.jit(cpu_kernels.int4_gemm, static_argnums=3)
    y32 = gemm(x, packed, scale, jnp.float32)
    x64, w64 = np.asarray(x, np.float64), np.asarray(quantize.dequantize(node, jnp.bfloat16), np.float64)
    assert np.all(np.abs(np.asarray(y32, np.float64) - x64 @ w64.T) <= _float32_bound(x64, w64))
    y16 = gemm(x, packed, scale, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(y16, np.float32), np.asarray(y32.astype(jnp.bfloat16), np.float32))
    if m == 17:  # the gradient: the plain product of the output's gradient with the float32 dequantised weight
        gx = jax.grad(lambda x: jnp.sum(jnp.sin(cpu_kernels.int4_gemm(x, packed, scale))))(x)
        deq = np.asarray(quantize.dequantize(node, jnp.float32), np.float64)
        want = np.cos(np.asarray(y32, np.float64)) @ deq  # [M, K], then rounded to x's bf16
        np.testing.assert_allclose(np.asarray(gx, np.float64), want, rtol=2**-7, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("quant, target", [(None, "pj_bf16_gemm_kn"), ("int8", "pj_int8_gemm_kn")])
def test_siglip_projections_take_the_policys_forms(quant, target):
    """SigLIP's projections (weights stored inputs first) are multiplied by `backend.project` like
    the decoder's: on an AMX policy, a bf16 model's vision tower lowers each of them (four in
    attention, two in the MLP, in the one scanned layer, and the projector) to the AMX GEMM for
    inputs-first weights, float or int8; a policy without AMX keeps XLA's dots."""
    amx = Policy("cpu", backend._AMX_FLAGS | backend._QUANT_KERNEL_FLAGS, cpu_kernels=True)
    pg = PaliGemma.from_pretrained(DEMO, dtype="bfloat16", quantize=quant)
    size, n_image = pg.config.image_size, pg.config.num_image_tokens
    pixels = jnp.zeros((1, size, size, 3), jnp.bfloat16)
    ids = jnp.full((1, n_image + 4), pg.config.image_token_id, jnp.int32).at[0, n_image:].set(2)

    def lowered(policy: Policy) -> str:
        module = dataclasses.replace(pg.module, policy=policy)
        return jax.jit(module.apply).lower({"params": pg.params}, pixels, ids).as_text()

    assert lowered(amx).count(f"@{target}(") == 7
    assert f"@{target}(" not in lowered(NO_KERNELS)


@pytest.mark.skipif(not CAN_AMX, reason="this CPU (or its kernel) gives no AMX: the policy never calls the GEMMs")
def test_amx_gemms_refuse_shapes_off_the_tiles():
    x = jnp.ones((32, 64), jnp.bfloat16)
    with pytest.raises(Exception, match="multiple of 16"):
        jax.block_until_ready(cpu_kernels.bf16_gemm(x, jnp.ones((24, 64), jnp.bfloat16)))
    with pytest.raises(Exception, match="one scale per output channel"):
        jax.block_until_ready(cpu_kernels.int8_gemm(x, jnp.ones((16, 64), jnp.int8), jnp.ones((16, 2), jnp.float32)))
    with pytest.raises(Exception, match="groups of K / G a multiple of 128"):
        jax.block_until_ready(cpu_kernels.int4_gemm(x, jnp.zeros((16, 32), jnp.uint8), jnp.ones((16, 1), jnp.float32)))
    with pytest.raises(Exception, match=r"w \[K, N\], N a multiple of 16"):
        jax.block_until_ready(cpu_kernels.bf16_gemm(x, jnp.ones((64, 24), jnp.bfloat16), jnp.float32, False))
    with pytest.raises(Exception, match="one scale per output channel"):
        jax.block_until_ready(cpu_kernels.int8_gemm(x, jnp.ones((64, 16), jnp.int8), jnp.ones((1, 8), jnp.float32),
                                                    jnp.float32, False))


@pytest.mark.skipif(not CAN_BF16, reason="this CPU lacks AVX512-BF16: the policy never calls the kernel (test above)")
def test_gradients_through_the_kernels_are_the_plain_products():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((8, 64)), jnp.bfloat16)
    loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w).astype(jnp.float32)))  # noqa: E731
    plain = lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32)  # noqa: E731
    got = jax.grad(loss(cpu_kernels.bf16_matvec), argnums=(0, 1))(x, w)
    want = jax.grad(loss(plain), argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2**-7, atol=1e-2)
    node = quantize.quantize(np.asarray(w, np.float32), Quantization("int8"), (1,))
    q, scale = node[quantize.QVALUE], node[quantize.SCALE]
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(cpu_kernels.quant_matvec(x, q, scale))))(x.astype(jnp.float32))
    deq = quantize.dequantize(node, jnp.float32)
    want_x = jax.grad(lambda x: jnp.sum(jnp.sin(x @ deq.T)))(x.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(want_x), rtol=1e-5, atol=1e-5)
    w4 = jnp.asarray(rng.standard_normal((8, 128)), jnp.float32)
    node = quantize.quantize(w4, Quantization("int4", 128), (1,))
    x4 = jnp.asarray(rng.standard_normal((2, 128)), jnp.bfloat16)
    packed = quantize.pack_int4(node[quantize.QVALUE])
    gx = jax.grad(lambda x: jnp.sum(jnp.sin(cpu_kernels.int4_matvec(x, packed, node[quantize.SCALE]))))(x4)
    deq = quantize.dequantize(node, jnp.float32)
    want_x = jax.grad(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32) @ deq.T)))(x4)
    np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(want_x, np.float32), rtol=2**-7, atol=1e-2)
    if CAN_AMX:  # the GEMMs share the matrix-vector products' backward passes (16 channels: whole tiles)
        w16 = jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)
        got = jax.grad(loss(cpu_kernels.bf16_gemm), argnums=(0, 1))(x, w16)
        got16 = jax.grad(loss(lambda x, w: cpu_kernels.bf16_gemm(x, w, jnp.bfloat16)), argnums=(0, 1))(x, w16)
        assert [g.dtype for g in got16] == [jnp.bfloat16, jnp.bfloat16]
        want = jax.grad(loss(plain), argnums=(0, 1))(x, w16)
        for g, r in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), rtol=2**-7, atol=1e-2)
        kn = lambda x, w: cpu_kernels.bf16_gemm(x, w, jnp.float32, False)  # noqa: E731
        got_x, got_w = jax.grad(loss(kn), argnums=(0, 1))(x, w16.T)  # inputs first: the weight's gradient too
        np.testing.assert_allclose(np.asarray(got_x, np.float32), np.asarray(want[0], np.float32), rtol=2**-7, atol=1e-2)
        np.testing.assert_allclose(np.asarray(got_w, np.float32), np.asarray(want[1], np.float32).T, rtol=2**-7, atol=1e-2)
        node = quantize.quantize(np.asarray(w16, np.float32), Quantization("int8"), (1,))
        deq = quantize.dequantize(node, jnp.float32)
        q, s = node[quantize.QVALUE], node[quantize.SCALE]
        want_x = jax.grad(lambda x: jnp.sum(jnp.sin(x.astype(jnp.float32) @ deq.T)))(x)
        for out_first in (True, False):
            int8 = lambda x: cpu_kernels.int8_gemm(x, q if out_first else q.T, s if out_first else s.T, jnp.float32, out_first)  # noqa: B023, E731
            gx = jax.grad(lambda x: jnp.sum(jnp.sin(int8(x))))(x)
            np.testing.assert_allclose(np.asarray(gx, np.float32), np.asarray(want_x, np.float32), rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(not (CAN_BF16 and CAN_QUANT), reason="this CPU lacks the kernels' instruction sets")
@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_decode_through_the_kernels_matches_the_model_without_them(quant):
    """The demo model decoding in bf16 (float weights, int8, int4) with the kernels and without
    (its prefill on AMX where the CPU has it): the same greedy answers on scenes it never saw,
    each token's log-probability within bf16 rounding (the two sum their products in different
    orders)."""
    pg = PaliGemma.from_pretrained(DEMO, dtype="bfloat16", quantize=quant)
    with_k = dataclasses.replace(pg, policy=KERNELS)
    without = dataclasses.replace(pg, policy=NO_KERNELS)
    scenes = shapes.scenes(8, seed=4242)
    images, prompts = [shapes.render(s) for s in scenes], ["caption en"] * 8
    got = with_k.generate(images, prompts, max_new_tokens=12, batch_size=4, output_scores=True)
    want = without.generate(images, prompts, max_new_tokens=12, batch_size=4, output_scores=True)
    assert [a.token_ids for a in got] == [a.token_ids for a in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=0.05)
