"""`cde_jax.hlo` reads optimized HLO text with regular expressions (no public API gives the
compiled module's structure). It is kept to the `aot` tooling (tests/test_layout.py: no
runtime module imports it), and this test is its guard against a jax/XLA upgrade that changes
the text: on the CPU backend, where XLA's own cost analysis exists, the tally must equal it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cde_jax import hlo


def test_tally_equals_xla_cost_analysis_on_cpu():
    def f(a, b, c):
        return (jnp.tanh(a @ b) @ c).sum(axis=0) * 2.0

    args = [jnp.ones((64, 128)), jnp.ones((128, 256)), jnp.ones((256, 32))]
    compiled = jax.jit(f).lower(*args).compile()
    module = hlo.Module(compiled.as_text())
    xla = compiled.cost_analysis()
    assert module.entry and len(list(module.executed())) >= 3
    assert module.bytes_accessed() == xla["bytes accessed"]
    assert module.matmul_flops() == 2 * 64 * 128 * 256 + 2 * 64 * 256 * 32
    assert not module.collectives() and module.while_loops() == 0


def test_while_loops_are_found():
    def g(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ b), a)

    compiled = jax.jit(g).lower(jnp.ones((64, 128)), jnp.ones((128, 128))).compile()
    module = hlo.Module(compiled.as_text())
    assert module.while_loops() == 1
    assert module.matmul_flops() == 2 * 64 * 128 * 128  # each dot instruction once
    assert sum(times for _, times in module.executed()) > len(list(module.executed()))
