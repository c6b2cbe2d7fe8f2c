"""The platform policy: built from the running backend once, named explicitly otherwise."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
    assert Policy("cpu").inference_layout(bf16) == Layout(stacked=False, out_first=True)
    assert Policy("cuda").inference_layout(bf16) == Layout(stacked=False, out_first=False)
    assert Policy("cpu").matmul_form(bf16, 1, True) == "left_zero"
    assert {Policy(p).matmul_form(bf16, 1, True) for p in ("cuda", "rocm", "tpu", None)} == {"dot_general"}
    assert Policy("cuda").attention_kernel(bf16, None) == "cudnn"
    assert Policy("cuda").attention_kernel(bf16, 50.0) == Policy("cuda").attention_kernel(jnp.float32, None) == "einsum"
    assert Policy("rocm").attention_kernel(bf16, None) == "einsum"
    consistent = {"xla_cpu_enable_platform_dependent_math": False}  # the same results on every CPU
    assert Policy("cpu").compiler_options(inference=False) == consistent
    assert Policy("cpu").compiler_options() == {**consistent, "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
    assert Policy("tpu").compiler_options() is None and Policy("cuda").compiler_options(inference=False) is None
    with pytest.raises(ValueError, match="unknown platform"):
        Policy("gpu")
