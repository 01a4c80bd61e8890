"""torch.library registration of the fake-quant ops under `eqk`: each op and its backward are
custom ops with fake impls, and the op's autograd formula calls the backward op, so opcheck
and torch.compile see no Python autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from ._fake_quant_kernels import (
    run_backward,
    run_forward,
    run_layered_backward,
    run_layered_forward,
)


def _wire(forward_op, backward_name: str, n_tensors: int) -> None:
    """Fake impls and autograd of a quantizer op whose first `n_tensors` inputs are tensors
    (x, scale[, zero_point]; the zero point may be None) and whose backward op
    `eqk::<backward_name>` takes (grad, *inputs) and returns one gradient per tensor input."""
    backward_op = getattr(torch.ops.eqk, backward_name)

    @forward_op.register_fake
    def _(x, *rest):
        return torch.empty_like(x)

    @torch.library.register_fake(f"eqk::{backward_name}")
    def _(grad, x, scale, *rest):
        return (torch.empty_like(x), *tuple(torch.empty_like(scale) for _ in range(n_tensors - 1)))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.args = inputs[n_tensors:]
        ctx.present = tuple(t is not None for t in inputs[:n_tensors])

    def backward(ctx, grad):
        grads = backward_op(grad, *ctx.saved_tensors, *ctx.args)
        grads = tuple(g if present else None for g, present in zip(grads, ctx.present))
        return (*grads, *([None] * len(ctx.args)))

    forward_op.register_autograd(backward, setup_context=setup_context)


@torch.library.custom_op("eqk::fake_quant", mutates_args=())
def _fake_quant_op(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    axis: int,
    grad_factor: float,
    backend: str,
) -> Tensor:
    return run_forward(backend, x, scale, zero_point, quant_min, quant_max, axis)


@torch.library.custom_op("eqk::fake_quant_backward", mutates_args=())
def _fake_quant_backward_op(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    quant_min: int,
    quant_max: int,
    axis: int,
    grad_factor: float,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return run_backward(
        backend, grad, x, scale, zero_point, quant_min, quant_max, axis, grad_factor
    )


@torch.library.custom_op("eqk::fake_quant_layered", mutates_args=())
def _fake_quant_layered_op(
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    axis: int,
    compensate: bool,
    grad_factor: float,
    backend: str,
) -> Tensor:
    return run_layered_forward(backend, x, scale, bits, top_bits, axis, compensate)


@torch.library.custom_op("eqk::fake_quant_layered_backward", mutates_args=())
def _fake_quant_layered_backward_op(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    bits: int,
    top_bits: int,
    axis: int,
    compensate: bool,
    grad_factor: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return run_layered_backward(
        backend, grad, x, scale, bits, top_bits, axis, compensate, grad_factor
    )


_wire(_fake_quant_op, "fake_quant_backward", n_tensors=3)
_wire(_fake_quant_layered_op, "fake_quant_layered_backward", n_tensors=2)
