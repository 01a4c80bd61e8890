"""Fake quantization whose form (integer range, layering, gradient scale) is tensor data.

`fake_quant` and `fake_quant_layered` take the range as Python ints, which `torch.compile`
bakes into the graph as constants: a supernet that switches width or form would recompile for
every new configuration. `fake_quant_form` takes the same quantities as tensors instead, so one
compiled graph serves every form:

  fake_quant_form(x, scale[C], zero_point[C], form[5], grad_factor[], *, axis, backend)

`form` holds (quant_min, quant_max, inv_step, step, comp), the parameters of the unified element
map the kernels already run (see `fake_quant`): a plain form is (qmin, qmax, 1, 1, 0), the
layered quantizer at `bits` of `top_bits` is (top range, 2^-k, 2^k, c_k) with a zero offset.
A per-tensor scale is passed broadcast to [C] and a symmetric form with a zero offset, so every
form of a weight quantizer has the same argument shapes. `form_row` / `layered_form_row` build
the rows. The forward is bit-identical to `fake_quant` / `fake_quant_layered` of the same form;
the scale gradient of a broadcast per-tensor form is the sum of per-channel sums (the same
terms, summed in a different order).

Per-group scales (`group_size=g`, axis 0): x of shape [N, K] (or [N, ...] flattened to [N, K])
with scale / zero_point of shape [N, K // g] run as the per-channel form of x viewed
[N * K / g, g], exactly as `fake_quant(..., group_size=g)` does; a per-channel or per-tensor
scale broadcast to [N, K // g] gives that form's forward bit for bit, so one graph serves the
tensor, channel and group forms of a weight quantizer alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext
from . import _fake_quant_checks as _checks
from . import _fake_quant_kernels as _kernels
from . import _fake_quant_ref as _ref

FORM_FIELDS = ("quant_min", "quant_max", "inv_step", "step", "comp")


def form_row(quant_min: int, quant_max: int) -> list[float]:
    """The `form` of `fake_quant(..., quant_min, quant_max)`."""
    return [float(quant_min), float(quant_max), 1.0, 1.0, 0.0]


def layered_form_row(bits: int, top_bits: int, compensate: bool = True) -> list[float]:
    """The `form` of `fake_quant_layered(..., bits, top_bits, compensate=compensate)`."""
    qmin, qmax, inv_step, step, comp = _ref.layered_consts(bits, top_bits, compensate)
    return [float(qmin), float(qmax), inv_step, step, comp]


def _unpack(form: Tensor):
    qmin, qmax, inv_step, step, comp = form.tolist()
    return int(qmin), int(qmax), inv_step, step, comp


def _forward_torch(x, s, zero_point, qmin, qmax, inv_step, step, comp, axis):
    s = _ref.bcast(s, x, axis)
    z = torch.round(_ref.bcast(zero_point, x, axis))
    v = x.float() * torch.reciprocal(s)
    q = torch.clamp(torch.round(v) + z, qmin, qmax)
    a = (torch.floor((q - z) * inv_step) + comp) * step  # exact: q - z is an integer, step 2^k
    return (a * s).to(x.dtype)


def _backward_torch(grad, x, s, zero_point, qmin, qmax, inv_step, step, comp, axis, grad_factor):
    sb = _ref.bcast(s, x, axis)
    z = torch.round(_ref.bcast(zero_point, x, axis))
    v = x.float() * torch.reciprocal(sb)
    nan = torch.isnan(v)
    u = torch.round(v) + z
    q = torch.clamp(u, qmin, qmax)
    inside = (u >= qmin) & (u <= qmax)
    a = (torch.floor((q - z) * inv_step) + comp) * step
    dy = grad.float()
    dx = _ref.nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
    t = torch.where(inside, a - v, a)
    dz_e = _ref.nan_where(nan, dy * torch.where(inside, torch.zeros_like(v), -sb))
    ds = grad_factor * _ref.reduce_to(dy * t, s, axis)
    dz = grad_factor * _ref.reduce_to(dz_e, s, axis)
    return dx.to(x.dtype), ds.to(s.dtype), dz.to(s.dtype)


def _layout_of(x: Tensor, y: Tensor) -> Tensor:
    """y with the strides of `torch.empty_like(x)`, what the fake implementations return: the ops
    take any input layout (flexible_layout), so a compiled graph keeps channels-last activations
    channels-last instead of converting them for the op."""
    if y.stride() == x.stride():
        return y
    out = torch.empty_like(x, dtype=y.dtype)
    out.copy_(y)
    return out


def _run_forward(backend, x, scale, zero_point, form, axis):
    _checks.body_checks(scale, zero_point)
    qmin, qmax, inv_step, step, comp = _unpack(form)
    name = _checks.resolve(backend, x.device, "fake_quant")
    if name == "torch":
        y = _forward_torch(x, scale, zero_point, qmin, qmax, inv_step, step, comp, axis)
        return _layout_of(x, y)
    s, inv_s, zr = _kernels.kernel_params(x, scale, zero_point, axis)
    y = _kernels.kernel_forward(name, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis)
    return _layout_of(x, y)


def _run_backward(backend, grad, x, scale, zero_point, form, grad_factor, axis, with_dx=True):
    qmin, qmax, inv_step, step, comp = _unpack(form)
    g = float(grad_factor)
    name = _checks.resolve(backend, x.device, "fake_quant")
    if name == "torch":
        dx, ds, dz = _backward_torch(
            grad, x, scale, zero_point, qmin, qmax, inv_step, step, comp, axis, g
        )
        return (_layout_of(x, dx) if with_dx else None), ds, dz
    s, inv_s, zr = _kernels.kernel_params(x, scale, zero_point, axis)
    dx, sum_t, sum_z = _kernels.kernel_backward(
        name, grad, x, s, inv_s, zr, qmin, qmax, inv_step, step, comp, axis, with_dx
    )
    ds = (g * sum_t).reshape(scale.shape).to(scale.dtype)
    dz = (g * sum_z).reshape(scale.shape).to(scale.dtype)
    return (_layout_of(x, dx) if with_dx else None), ds, dz


@torch.library.custom_op("eqk::fake_quant_form", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def _fake_quant_form_op(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    form: Tensor,
    grad_factor: Tensor,
    axis: int,
    backend: str,
) -> Tensor:
    return _run_forward(backend, x, scale, zero_point, form, axis)


@_fake_quant_form_op.register_fake
def _(x, scale, zero_point, form, grad_factor, axis, backend):
    return torch.empty_like(x)


@torch.library.custom_op(
    "eqk::fake_quant_form_backward", mutates_args=(), tags=(torch.Tag.flexible_layout,)
)
def _fake_quant_form_backward_op(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    form: Tensor,
    grad_factor: Tensor,
    axis: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return _run_backward(backend, grad, x, scale, zero_point, form, grad_factor, axis)


@_fake_quant_form_backward_op.register_fake
def _(grad, x, scale, zero_point, form, grad_factor, axis, backend):
    return torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale)


_BACKWARD_ARGS = (
    "Tensor grad, Tensor x, Tensor scale, Tensor zero_point, Tensor form, Tensor grad_factor, "
    "int axis, str backend"
)


@torch.library.custom_op(
    "eqk::fake_quant_form_step_sums",
    mutates_args=(),
    schema=f"({_BACKWARD_ARGS}) -> (Tensor, Tensor)",
    tags=(torch.Tag.flexible_layout,),
)
def _fake_quant_form_step_sums_op(grad, x, scale, zero_point, form, grad_factor, axis, backend):
    """The (scale, zero point) gradients of the backward op, without dx: the kernel only reads.
    A per-tensor form on the C++ kernel takes one call (`fake_quant_step_sums_cpu`: the same
    values, without the Python path's dozen small tensor operations per call)."""
    if axis == _ref.PER_TENSOR and _checks.resolve(backend, x.device, "fake_quant") == "cpp":
        step_sums = _ext.kernel("fake_quant_step_sums_cpu")
        return step_sums(grad, x, scale, zero_point, form, grad_factor, -1)
    _, ds, dz = _run_backward(
        backend, grad, x, scale, zero_point, form, grad_factor, axis, with_dx=False
    )
    return ds, dz


@_fake_quant_form_step_sums_op.register_fake
def _(grad, x, scale, zero_point, form, grad_factor, axis, backend):
    return torch.empty_like(scale), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, form, grad_factor, axis, backend = inputs
    ctx.save_for_backward(x, scale, zero_point, form, grad_factor)
    ctx.args = (axis, backend)


def _backward(ctx, grad):
    x, scale, zero_point, form, grad_factor = ctx.saved_tensors
    axis, backend = ctx.args
    dx, ds, dz = torch.ops.eqk.fake_quant_form_backward(
        grad, x, scale, zero_point, form, grad_factor, axis, backend
    )
    return dx, ds, dz, None, None, None, None


_fake_quant_form_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, scale, zero_point, form, grad_factor, axis) -> int:
    _checks.check_x(x)
    ax = _checks.normalize_axis(x, axis)
    _checks.check_param("scale", scale, x, ax)
    _checks.check_param("zero_point", zero_point, x, ax)
    if not isinstance(form, Tensor) or tuple(form.shape) != (len(FORM_FIELDS),):
        shape = tuple(form.shape) if isinstance(form, Tensor) else type(form).__name__
        raise ValueError(f"form has shape {shape}: accepted is a tensor [{', '.join(FORM_FIELDS)}]")
    if not isinstance(grad_factor, Tensor) or grad_factor.numel() != 1:
        raise ValueError("grad_factor must be a one-element tensor")
    return ax


def fake_quant_form(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    form: Tensor,
    grad_factor: Tensor,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    backend: str | None = "auto",
) -> Tensor:
    """Fake-quantize x with the form given as data (module docstring). scale and zero_point:
    [1] per-tensor (axis=None), [x.shape[axis]], or [N, K // group_size] per group (axis 0);
    form: [quant_min, quant_max, inv_step, step, comp]; grad_factor: one-element tensor (the
    LSQ gradient scale). Differentiable in x, scale and zero_point. Values are checked like
    `fake_quant`'s in eager mode."""
    if group_size is not None:
        xg, sg, zg = _checks.group_view(x, scale, zero_point, axis, group_size)
        y = fake_quant_form(xg, sg, zg, form, grad_factor, axis=0, backend=backend)
        return y.reshape(x.shape)
    ax = _check(x, scale, zero_point, form, grad_factor, axis)
    _checks.check_values("scale", scale, positive=True)
    _checks.check_values("zero_point", zero_point, positive=False)
    name = _checks.backend_arg(backend, x, "fake_quant")
    return torch.ops.eqk.fake_quant_form(
        x, scale, zero_point, form, grad_factor.reshape(()), ax, name
    )


# --------------------------------------------------------------------------------------------
# The same map in plain torch ops: traced into a compiled graph, where inductor fuses it with
# the neighbouring element-wise work instead of calling an opaque kernel.
#
# The backward of a per-tensor form (an activation) may use the fake-quant kernel
# (kernel_backward=True). On the CPU the `eqk::fake_quant_form_step_sums` op returns the two
# step-size sums only (the kernel reads x and dy and writes nothing large), and dx stays plain
# ops that read three buffers (dy, x and one row [s, z, qmin, qmax]), so inductor inlines it
# into the ReLU / batch-norm backward that consumes it instead of storing it. On other devices
# the `eqk::fake_quant_form_backward` op returns dx as well. Traced as plain ops, the LSQ sums
# made inductor store extra full-size buffers next to the batch-norm backward (each term reads
# more buffers than it inlines into several consumers), and the partitioner saved an
# intermediate of the map rather than the input x. The ops take x, so x (the ReLU output) is
# what the forward saves.


def _inline_map(x, scale, zero_point, form, axis):
    s = _ref.bcast(scale, x, axis)
    z = torch.round(_ref.bcast(zero_point, x, axis))
    qmin, qmax, inv_step, step, comp = form.float().unbind()
    v = x.float() * torch.reciprocal(s)
    u = torch.round(v) + z
    q = torch.minimum(torch.maximum(u, qmin), qmax)
    a = (torch.floor((q - z) * inv_step) + comp) * step
    return s, v, u, a, qmin, qmax


def _range_row(scale, zero_point, form):
    """[s, round(z), qmin, qmax] of a per-tensor form in one fp32 buffer."""
    z = torch.round(zero_point.reshape(1).float())
    return torch.cat([scale.reshape(1).float(), z, form[:2].float()])


def _dx_from_row(grad, x, row):
    # Slices of the one saved row, not separate scalars: the expression reads three buffers
    # (dy, x, row), few enough for inductor to inline it into each of its consumers.
    s, z, qmin, qmax = (row[i : i + 1] for i in range(4))
    v = x.float() * torch.reciprocal(s)
    u = torch.round(v) + z
    inside = (u >= qmin) & (u <= qmax)
    dy = grad.float()
    dx = _ref.nan_where(torch.isnan(v), torch.where(inside, dy, torch.zeros_like(dy)))
    return dx.to(x.dtype)


class _InlineForm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, form, grad_factor, axis, kernel_backward):
        saved = [x, scale, zero_point, form, grad_factor]
        # kernel_backward: None (plain ops), or the backend of the step-size sums
        ctx.sums_only = kernel_backward is not None and x.device.type == "cpu"
        if ctx.sums_only:
            saved.append(_range_row(scale, zero_point, form))
        ctx.save_for_backward(*saved)
        ctx.axis = axis
        ctx.kernel_backward = kernel_backward
        s, _, _, a, _, _ = _inline_map(x, scale, zero_point, form, axis)
        return (a * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero_point, form, grad_factor = ctx.saved_tensors[:5]
        args = (grad, x, scale, zero_point, form, grad_factor, ctx.axis, ctx.kernel_backward)
        if ctx.sums_only:
            ds, dz = torch.ops.eqk.fake_quant_form_step_sums(*args)
            dx = _dx_from_row(grad, x, ctx.saved_tensors[5])
            return dx, ds, dz, None, None, None, None
        if ctx.kernel_backward is not None:
            dx, ds, dz = torch.ops.eqk.fake_quant_form_backward(*args)
            return dx, ds, dz, None, None, None, None
        s, v, u, a, qmin, qmax = _inline_map(x, scale, zero_point, form, ctx.axis)
        nan = torch.isnan(v)
        inside = (u >= qmin) & (u <= qmax)
        dy = grad.float()
        dx = _ref.nan_where(nan, torch.where(inside, dy, torch.zeros_like(dy)))
        t = torch.where(inside, a - v, a)
        dz_e = _ref.nan_where(nan, dy * torch.where(inside, torch.zeros_like(v), -s))
        g = grad_factor.float()
        ds = (g * _ref.reduce_to(dy * t, scale, ctx.axis)).to(scale.dtype)
        dz = (g * _ref.reduce_to(dz_e, scale, ctx.axis)).to(scale.dtype)
        return dx.to(x.dtype), ds, dz, None, None, None, None


def fake_quant_form_inline(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    form: Tensor,
    grad_factor: Tensor,
    *,
    axis: int | None = None,
    group_size: int | None = None,
    kernel_backward: bool = False,
    backend: str | None = "auto",
) -> Tensor:
    """`fake_quant_form` as plain torch ops (no custom op, no kernel): for compiled graphs,
    where inductor fuses it. Same forward; gradients equal up to summation order.

    kernel_backward=True: a per-tensor form (axis None) takes its step-size gradients from the
    fake-quant kernel with `backend` (`eqk::fake_quant_form_step_sums` on the CPU, dx then as
    plain ops; `eqk::fake_quant_form_backward` elsewhere; see the note above); forms with an
    axis keep the plain-op backward."""
    if group_size is not None:
        xg, sg, zg = _checks.group_view(x, scale, zero_point, axis, group_size)
        y = fake_quant_form_inline(xg, sg, zg, form, grad_factor, axis=0)
        return y.reshape(x.shape)
    ax = _check(x, scale, zero_point, form, grad_factor, axis)
    name = None
    if kernel_backward and ax == _ref.PER_TENSOR:
        name = _checks.backend_arg(backend, x, "fake_quant")
    return _InlineForm.apply(x, scale, zero_point, form, grad_factor.reshape(()), ax, name)
