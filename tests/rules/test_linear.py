"""Gemm and MatMul: transposes, bias shapes, constant operand on either side, two activations."""

from __future__ import annotations

import pytest

from spa.rules.base import BlockCode

from ._graphs import group_codes, group_of, kept_of, model, prune_and_check


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias_shape", [(8,), (1, 8)], ids=["bias[N]", "bias[1,N]"])
def test_gemm(trans_b, bias_shape):
    w1 = (8, 5) if trans_b else (5, 8)
    w2 = (3, 8) if trans_b else (8, 3)
    m = model(
        f"""
        g (float[2,5] x) => (float[2,3] y) {{
          h = Gemm <transB={trans_b}, alpha=0.5, beta=2.0> (x, w1, c1)
          r = Relu(h)
          y = Gemm <transB={trans_b}> (r, w2, c2)
        }}""",
        w1=w1, c1=bias_shape, w2=w2, c2=(3,),
    )
    out_axis, in_axis = (0, 1) if trans_b else (1, 0)
    res = prune_and_check(m, sliced={"w1": out_axis, "c1": len(bias_shape) - 1, "w2": in_axis}, kept={"w1": in_axis})
    assert kept_of(res, "w1", out_axis) == kept_of(res, "w2", in_axis)


def test_gemm_trans_a():
    # A transposed activation: Y = Aᵀ·B with A[K, M]; the free weight axis is still N.
    m = model(
        """
        g (float[5,2] x) => (float[2,3] y) {
          h = Gemm <transA=1> (x, w1, c1)
          r = Relu(h)
          y = Gemm (r, w2, c2)
        }""",
        w1=(5, 8), c1=(8,), w2=(8, 3), c2=(3,),
    )
    prune_and_check(m, sliced={"w1": 1, "w2": 0})


def test_matmul_2d():
    m = model(
        """
        g (float[4,6] x) => (float[4,3] y) {
          h = MatMul(x, w1)
          z = Add(h, b1)
          r = Relu(z)
          y = MatMul(r, w2)
        }""",
        w1=(6, 8), b1=(8,), w2=(8, 3),
    )
    prune_and_check(m, sliced={"w1": 1, "b1": 0, "w2": 0})


def test_matmul_batched_3d_activation():
    m = model(
        """
        g (float[2,5,6] x) => (float[2,5,3] y) {
          h = MatMul(x, w1)
          r = Relu(h)
          y = MatMul(r, w2)
        }""",
        w1=(6, 8), w2=(8, 3),
    )
    prune_and_check(m, sliced={"w1": 1, "w2": 0}, kept={"w1": 0, "w2": 1})


def test_matmul_constant_first_input():
    # Y = W·X: the constant's row axis produces the channels, the next W reads them.
    m = model(
        """
        g (float[6,4] x) => (float[3,4] y) {
          h = MatMul(w1, x)
          r = Relu(h)
          y = MatMul(w2, r)
        }""",
        w1=(8, 6), w2=(3, 8),
    )
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1}, kept={"w1": 1, "w2": 0})
    assert kept_of(res, "w1", 0) == kept_of(res, "w2", 1)


def test_matmul_of_two_activations_blocks():
    # q·kᵀ style: both operands are activations, so the contracted channels mix.
    m = model(
        """
        g (float[4,6] x) => (float[4,4] y) {
          q = MatMul(x, wq)
          k = MatMul(x, wk)
          kt = Transpose <perm=[1,0]> (k)
          y = MatMul(q, kt)
        }""",
        wq=(6, 8), wk=(6, 8),
    )
    assert BlockCode.CHANNEL_MIXING in group_codes(m, "q", 1)
    assert group_of(m, "q", 1).n_free == 0


def test_gemm_full_matrix_bias():
    # C[M, N]: sliced along N with the channels, the M axis follows the batch.
    m = model(
        """
        g (float[2,5] x) => (float[2,3] y) {
          h = Gemm <transB=1> (x, w1, c1)
          r = Relu(h)
          y = Gemm <transB=1> (r, w2, c2)
        }""",
        w1=(8, 5), c1=(2, 8), w2=(3, 8), c2=(2, 3),
    )
    prune_and_check(m, sliced={"w1": 0, "c1": 1, "w2": 1}, kept={"c1": 0})


def test_matmul_with_constant_vector():
    # [4, 8] @ v[8] → [4]: the vector's only axis reads the channels.
    m = model(
        """
        g (float[4,5] x) => (float[4] y) {
          h = Gemm <transB=1> (x, w1, c1)
          r = Relu(h)
          y = MatMul(r, v)
        }""",
        w1=(8, 5), c1=(8,), v=(8,),
    )
    prune_and_check(m, sliced={"w1": 0, "c1": 0, "v": 0})


def test_matmul_batched_constant_weight():
    # A per-batch constant weight [2, 6, 8]: its batch axis follows the activation's batch.
    m = model(
        """
        g (float[2,5,6] x) => (float[2,5,3] y) {
          h = MatMul(x, w1)
          r = Relu(h)
          y = MatMul(r, w2)
        }""",
        w1=(2, 6, 8), w2=(2, 8, 3),
    )
    prune_and_check(m, sliced={"w1": 2, "w2": 1}, kept={"w1": (0, 1), "w2": (0, 2)})


def test_weight_shared_by_two_gemms():
    # One initializer read by two nodes couples their output channels into one group.
    m = model(
        """
        g (float[2,5] x1, float[2,5] x2) => (float[2,3] y, float[2,3] y2) {
          h1 = Gemm <transB=1> (x1, w1, c1)
          r1 = Relu(h1)
          y = Gemm <transB=1> (r1, w2, c2)
          h2 = Gemm <transB=1> (x2, w1, c1)
          r2 = Sigmoid(h2)
          y2 = Gemm <transB=1> (r2, w3, c2)
        }""",
        w1=(8, 5), c1=(8,), w2=(3, 8), c2=(3,), w3=(3, 8),
    )
    assert group_of(m, "h1", 1).id == group_of(m, "h2", 1).id
    res = prune_and_check(m, sliced={"w1": 0, "w2": 1, "w3": 1})
    assert kept_of(res, "w2", 1) == kept_of(res, "w3", 1) == kept_of(res, "w1", 0)
