"""Compile once: a supernet's form reaches a compiled graph as data, never as a constant.

`fake_quant_form` is checked against a float64 oracle written here from the unified element map
(DESIGN.md "Quantization math"); the supernet under torch.compile against its own eager forward
(the numerics of record, bit-identical in the forward) while counting the graphs compiled.
The counting backend is AOTAutograd with the graphs run as traced (what "aot_eager" does), so
the backward is a compiled graph too and every form's parameter is an input of it.
"""

import copy

import eqnet
import pytest
import torch
from conftest import requires_cpp
from eqnet.nn import form_data
from eqnet.space import ElasticSpace, SubnetConfig
from graph_counter import GraphCounter
from torch import nn

import eqkernels


# -- oracle -------------------------------------------------------------------------------------
def _b(p, x, axis):
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1
    return p.double().reshape(shape) if axis is not None else p.double().reshape(())


def oracle(x, s, z, qmin, qmax, k, comp, axis, dy, g):
    """(y, dx, ds, dz) of one form: quantize at [qmin, qmax] with offset z, keep all but the
    k low bits (floor), add comp, dequantize with step 2^k s; LSQ(+) gradients times g."""
    inv = torch.reciprocal(s.float())  # the one fp32 step: v = fl32(x * fl32(1/s))
    v = (x.float() * (_b(inv, x, axis).float())).double()
    zr = torch.round(_b(z, x, axis))
    u = torch.round(v) + zr
    q = torch.clamp(u, qmin, qmax)
    a = (torch.floor((q - zr) / 2**k) + comp) * 2**k
    y = a * _b(s, x, axis)
    inside = (u >= qmin) & (u <= qmax)
    dyd = dy.double()
    nan = torch.isnan(v)  # the NaN rule: a NaN input gives NaN out, NaN dx, NaN group grads
    dx = torch.where(nan, torch.nan, torch.where(inside, dyd, 0.0))
    t = torch.where(inside, a - v, a)
    dims = [d for d in range(x.dim()) if d != axis] if axis is not None else list(range(x.dim()))
    ds = g * (dyd * t).sum(dims)
    dz_e = torch.where(nan, torch.nan, dyd * torch.where(inside, 0.0, -_b(s, x, axis)))
    dz = g * dz_e.sum(dims)
    return y, dx, ds.reshape(s.shape), dz.reshape(s.shape)


BACKENDS = ["torch", pytest.param("cpp", marks=requires_cpp), "inline"]
# the plain-op forward with the kernel's step-size sums (per-tensor forms; others ignore it)
KERNEL_BACKWARD = [pytest.param("inline-cpp-backward", marks=requires_cpp), "inline-torch-backward"]


def _run_form(backend, x, s, z, form, g, axis):
    if backend == "inline":  # the plain-torch form compiled graphs trace
        return eqkernels.fake_quant_form_inline(x, s, z, form, g, axis=axis)
    if backend.startswith("inline-"):
        name = backend.split("-")[1]
        return eqkernels.fake_quant_form_inline(
            x, s, z, form, g, axis=axis, kernel_backward=True, backend=name
        )
    return eqkernels.fake_quant_form(x, s, z, form, g, axis=axis, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS + KERNEL_BACKWARD)
@pytest.mark.parametrize(
    "kind, axis",
    [("asym", 0), ("sym_per_tensor_broadcast", 0), ("layered", 0), ("asym", None)],
)
def test_fake_quant_form_matches_oracle(backend, kind, axis):
    x = torch.randn(6, 5, 3) * 2
    x[0, 0, 0] = 40.0  # outside the grid: clamped, scale gradient from the outside branch
    x[1, 2, 1] = float("nan")
    c = x.shape[0] if axis is not None else 1
    s = torch.rand(c) * 0.3 + 0.05
    z = torch.zeros(c)
    k, comp = 0, 0.0
    if kind == "asym":
        z = torch.randint(-3, 4, (c,)).float() + 0.3
        row = eqkernels.form_row(0, 15)
        qmin, qmax = 0, 15
    elif kind == "sym_per_tensor_broadcast":
        s = s[:1].expand(c).clone()
        row = eqkernels.form_row(-4, 3)
        qmin, qmax = -4, 3
    else:
        row = eqkernels.layered_form_row(2, 5)
        qmin, qmax, k, comp = -16, 15, 3, (1 - 2.0**-3) / 2
    form = torch.tensor(row, dtype=torch.float64)
    g = torch.tensor(0.37, dtype=torch.float64)
    xs, ss, zs = (t.clone().requires_grad_() for t in (x, s, z))
    y = _run_form(backend, xs, ss, zs, form, g, axis)
    dy = torch.randn_like(x)
    y.backward(dy)
    ref_y, ref_dx, ref_ds, ref_dz = oracle(x, s, z, qmin, qmax, k, comp, axis, dy, 0.37)
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(y, ref_y.float(), **exact)
    torch.testing.assert_close(xs.grad, ref_dx.float(), **exact)
    torch.testing.assert_close(ss.grad.double(), ref_ds, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(zs.grad.double(), ref_dz, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(ss.grad).any()  # the NaN is not hidden


@pytest.mark.parametrize("backend", BACKENDS + KERNEL_BACKWARD)
@pytest.mark.parametrize("kind", ["asym", "layered"])
def test_per_tensor_form_of_a_channels_last_activation(backend, kind):
    """An NCHW activation stored channels-last (what convolutions hand on): the per-tensor
    kernels run over it in memory order; values, gradients and the layout match the oracle."""
    x = (torch.randn(3, 5, 4, 6) * 2).contiguous(memory_format=torch.channels_last)
    x[0, 1, 2, 3] = 50.0
    x[2, 4, 0, 1] = float("-inf")
    x[1, 0, 3, 5] = float("nan")
    s, z = torch.tensor([0.21]), torch.tensor([3.4])
    if kind == "asym":
        row, qmin, qmax, k, comp = eqkernels.form_row(0, 15), 0, 15, 0, 0.0
    else:
        z = torch.zeros(1)
        row = eqkernels.layered_form_row(3, 6)
        qmin, qmax, k, comp = -32, 31, 3, (1 - 2.0**-3) / 2
    form = torch.tensor(row, dtype=torch.float64)
    xs, ss, zs = (t.clone().requires_grad_() for t in (x, s, z))
    y = _run_form(backend, xs, ss, zs, form, torch.tensor(0.25, dtype=torch.float64), None)
    dy = torch.randn(x.shape).contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    ref_y, ref_dx, ref_ds, ref_dz = oracle(x, s, z, qmin, qmax, k, comp, None, dy, 0.25)
    exact = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(y, ref_y.float(), **exact)
    torch.testing.assert_close(xs.grad, ref_dx.float(), **exact)
    assert y.stride() == x.stride() and xs.grad.stride() == x.stride()
    torch.testing.assert_close(ss.grad.double(), ref_ds, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(zs.grad.double(), ref_dz, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(ss.grad).all() and torch.isnan(zs.grad).all()  # the NaN is not hidden


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("axis", [0, 1, -1], ids=["axis0", "axis1", "per-tensor"])
def test_fake_quant_form_opcheck(backend, axis):
    """The ops take any layout (flexible_layout); their outputs have empty_like(x)'s strides,
    as the fake implementations say, also for a channels-last x."""
    x = torch.randn(4, 3, 5, 2).contiguous(memory_format=torch.channels_last)
    c = 1 if axis == -1 else x.shape[axis]
    s = (torch.rand(c) * 0.2 + 0.05).requires_grad_()
    z = torch.full((c,), 2.0, requires_grad=True)
    form = torch.tensor(eqkernels.form_row(-8, 7), dtype=torch.float64)
    g = torch.tensor(0.5, dtype=torch.float64)
    args = (x.requires_grad_(), s, z, form, g, axis, backend)
    torch.library.opcheck(torch.ops.eqk.fake_quant_form.default, args)
    dy = torch.randn(x.shape)  # NCHW-contiguous while x is channels-last
    args = (dy, x.detach(), s.detach(), z.detach(), form, g, axis, backend)
    torch.library.opcheck(torch.ops.eqk.fake_quant_form_backward.default, args)
    dx, ds, dz = torch.ops.eqk.fake_quant_form_backward(*args)
    assert dx.stride() == x.stride()
    # The sums-only op: the same sums, bit for bit (the kernel skips only the dx store).
    torch.library.opcheck(torch.ops.eqk.fake_quant_form_step_sums.default, args)
    sums = torch.ops.eqk.fake_quant_form_step_sums(*args)
    torch.testing.assert_close(sums, (ds, dz), rtol=0, atol=0)


def _layouts(shape, layout, dtype):
    """(x, dy) of `shape` in the named memory layouts."""
    x = torch.randn(shape) * 2
    x[0, 1, 2, 3] = 60.0  # clipped
    x[1, 0, 1, 1] = float("-inf")
    dy = torch.randn(shape)
    cl = torch.channels_last
    if layout == "channels-last":
        x, dy = x.contiguous(memory_format=cl), dy.contiguous(memory_format=cl)
    elif layout == "x-channels-last-dy-nchw":
        x = x.contiguous(memory_format=cl)
    elif layout == "x-nchw-dy-channels-last":
        dy = dy.contiguous(memory_format=cl)
    elif layout == "strided":  # not dense: every other column of a wider tensor
        x = torch.cat([x, x], dim=3)[..., ::2]
        dy = torch.cat([dy, dy], dim=3)[..., ::2]
    return x.to(dtype), dy.to(dtype)


@requires_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "layout",
    [
        "contiguous",
        "channels-last",
        "x-channels-last-dy-nchw",
        "x-nchw-dy-channels-last",
        "strided",
    ],
)
@pytest.mark.parametrize("nan", [False, True], ids=["finite", "nan"])
def test_step_sums_one_call_path(dtype, layout, nan):
    """The step-sums op of a per-tensor form runs one C++ call on the CPU: it must give the
    oracle's sums, and the Python kernel path's (which it replaces) bit for bit, in every
    layout of x and dy."""
    from eqkernels.ops import fake_quant_form as fqf

    x, dy = _layouts((3, 5, 4, 6), layout, dtype)
    if nan:
        x[2, 4, 3, 5] = float("nan")
    s, z = torch.tensor([0.23]), torch.tensor([2.6])
    form = torch.tensor(eqkernels.form_row(0, 15), dtype=torch.float32)
    g = torch.tensor(0.31, dtype=torch.float64)
    got = torch.ops.eqk.fake_quant_form_step_sums(dy, x, s, z, form, g, -1, "cpp")
    _, ds, dz = fqf._run_backward("cpp", dy, x, s, z, form, g, -1, with_dx=False)
    torch.testing.assert_close(got, (ds, dz), rtol=0, atol=0, equal_nan=True)
    assert got[0].shape == s.shape and got[0].dtype == s.dtype
    _, _, ref_ds, ref_dz = oracle(x, s, z, 0, 15, 0, 0.0, None, dy, 0.31)
    torch.testing.assert_close(got[0].double(), ref_ds, rtol=1e-5, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(got[1].double(), ref_dz, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(got[0]).all() == nan  # a NaN input is not hidden


def test_fake_quant_form_rejects_bad_form_shape():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="form has shape"):
        eqkernels.fake_quant_form(
            x, torch.ones(1), torch.zeros(1), torch.zeros(3), torch.tensor(1.0)
        )


# -- compile once -------------------------------------------------------------------------------


FULL = ElasticSpace(
    w_bits=(2, 4, 8),
    a_bits=(2, 8),
    w_granularities=("tensor", "channel"),
    w_symmetries=("sym", "asym"),
    a_symmetries=("sym", "asym"),
)
NESTED = ElasticSpace(w_bits=(2, 3, 4), a_bits=(2, 3, 4), nested=True)
# Widths only: every quantizer's forms share one granularity and symmetry (one form group), so
# the compiled graph reads the active form's parameters (`active_tensors`) and nothing else.
WIDTHS = ElasticSpace(w_bits=(2, 4, 8), a_bits=(2, 8), a_symmetries=("asym",))


def _net(space, per_bit_bn=False):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )
    example = torch.randn(1, 1, 8, 8)
    net = eqnet.convert(
        model, space, keep_first_last="elastic", per_bit_bn=per_bit_bn, example_input=example
    )
    eqnet.calibrate(net, [(torch.randn(8, 1, 8, 8), None)], batches=1, method="lsq")
    return net


def _step(model, x, configs, net):
    """Backward of each config in turn into the same .grad (a sandwich-rule step)."""
    net.zero_grad(set_to_none=True)
    outs = []
    for cfg in configs:
        net.set_config(cfg)
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
    return outs, {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "space, per_bit_bn",
    [(FULL, False), (WIDTHS, False), pytest.param(NESTED, True, marks=pytest.mark.slow)],
    ids=["forms", "widths", "nested-per-bit-bn"],
)
@pytest.mark.parametrize(
    "mode",
    [
        "inline-kernel-backward",
        pytest.param("inline", marks=pytest.mark.slow),
        pytest.param("kernel-op", marks=pytest.mark.slow),
    ],
)
def test_random_per_layer_configs_compile_one_graph(space, per_bit_bn, mode, monkeypatch):
    """mode: plain-op forward with the activations' backward by the kernel op (the default),
    all plain ops (EQK_COMPILE_INLINE_BACKWARD=1), or the kernel ops (EQK_COMPILE_KERNEL=1)."""
    torch._dynamo.reset()
    monkeypatch.setattr(form_data, "KERNEL_IN_GRAPHS", mode == "kernel-op")
    monkeypatch.setattr(form_data, "INLINE_BACKWARD", mode == "inline")
    net = _net(space, per_bit_bn).train()
    groups = [len(q.form_groups) for q in net.quantizers().values()]
    # FULL mixes granularities and symmetries in every quantizer: the graph picks the active
    # form's group among 2 (activations) or 4 (weights); the other spaces have one group.
    assert set(groups) == ({2, 4} if space is FULL else {1})
    counter = GraphCounter()
    compiled = torch.compile(net, backend=counter.backend)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8)
    for i in range(20):
        if i % 5:  # a new random subnet: forward and backward through the compiled graph
            net.set_config(SubnetConfig.random(space, net, generator=gen))
            compiled(x).square().sum().backward()
            continue
        # Every 5th step against eager: two subnets' gradients accumulated (sandwich rule).
        cfgs = [SubnetConfig.random(space, net, generator=gen) for _ in range(2)]
        got, got_grads = _step(compiled, x, cfgs, net)
        want, want_grads = _step(net, x, cfgs, net)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        # Inactive forms get no gradient, as in eager mode (an optimizer skips them).
        assert got_grads.keys() == want_grads.keys()
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6)
    assert counter.forward_graphs == 1
    net.eval()
    with torch.no_grad():
        for _ in range(5):
            net.set_config(SubnetConfig.random(space, net, generator=gen))
            assert torch.equal(compiled(x), net(x))
    assert counter.forward_graphs == 2  # train and eval differ (batch norm)


@pytest.mark.parametrize("replace", ["load_state_dict-assign", "overwrite-on-conversion"])
@pytest.mark.parametrize("space", [WIDTHS, FULL], ids=["widths", "forms"])
def test_compiled_graph_follows_replaced_parameters(replace, space):
    """The compiled graph reads each form group's parameters and the active width's batch norm
    through bound tensors: after the parameters are replaced by new objects, it must read and
    train the new ones, with no config switch in between."""
    torch._dynamo.reset()
    net = _net(space, per_bit_bn=True).train()
    net.set_config(SubnetConfig.uniform(space, net, 4, 8, "channel", "sym", "asym"))
    counter = GraphCounter()
    compiled = torch.compile(net, backend=counter.backend)
    x = torch.randn(5, 1, 8, 8)
    compiled(x)
    if replace == "load_state_dict-assign":
        state = {k: v * 1.5 if ".scale_" in k else v.clone() for k, v in net.state_dict().items()}
        net.load_state_dict(state, assign=True)
    else:
        overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
        torch.__future__.set_overwrite_module_params_on_conversion(True)
        try:
            old = list(net.parameters())  # held, so that no id is reused
            net.float()  # new Parameter objects over the same storage
            assert not {id(p) for p in old} & {id(p) for p in net.parameters()}
        finally:
            torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    net.eval()  # running statistics are left alone, so both passes see the same ones
    got = compiled(x)
    want = net(x)
    assert torch.equal(got, want)
    got.square().sum().backward()
    for q in net.quantizers().values():
        bits, gran, sym = q.active_form
        scale, zero_point = q.raw_parameters(bits, gran, sym)
        bound = q.active_tensors[q.form_groups.index((q.held_granularity(gran), sym))]
        assert bound[0] is scale and scale.grad is not None
        assert bound[1] is zero_point
        for (g, s), (other, _) in zip(q.form_groups, q.active_tensors):
            assert other is q.raw_parameters(bits, g, s)[0]
            if other is not scale:
                assert other.grad is None  # an inactive group: its zero gradient dropped
    bns = list(net.switchable_bns().values())
    assert bns
    for bn in bns:
        assert bn.active_tensors[0] is bn.active_bn.weight and bn.active_bn.weight.grad is not None
        assert bn.active_tensors[2] is bn.active_bn.running_mean
    assert counter.forward_graphs == 2  # train, then eval


def test_state_dict_keys_unchanged_by_the_form_buffers():
    net = _net(FULL)
    keys = set(net.state_dict())
    assert not any(k.endswith(("form_index", "form_table")) for k in keys)
    fresh = eqnet.convert(
        nn.Sequential(
            nn.Conv2d(1, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 3),
        ),
        FULL,
        keep_first_last="elastic",
    )
    fresh.load_state_dict(net.state_dict())
    for q_old, q_new in zip(net.quantizers().values(), fresh.quantizers().values()):
        # The activation range table follows the loaded signedness.
        assert torch.equal(q_old.form_table, q_new.form_table)


def _expected_row(bits, signed, nested, top_bits):
    """A form row from the element map's definition, in float64."""
    if nested:  # the top range; keep the top `bits` of `top_bits`: step 2^k, c_k the mean
        k = top_bits - bits
        top = 2 ** (top_bits - 1)
        return [-top, top - 1, 2.0**-k, 2.0**k, (1 - 2.0**-k) / 2]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return [lo, hi, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("layered", [False, True])
def test_form_table_is_float32_and_exact(layered):
    """The compiled element loops read the form row in float32 (no per-iteration conversion):
    every field must still be exactly the float64 value of its definition."""
    widths = tuple(range(2, 9))
    net = _net(ElasticSpace(w_bits=widths, a_bits=widths, nested=layered))
    checked = 0
    for q in net.quantizers().values():
        assert q.form_table.dtype == torch.float32
        for row, (bits, _gran, _sym) in zip(q.form_table, q.forms()):
            want = _expected_row(bits, q.signed, q.nested, getattr(q, "top_bits", None))
            assert row.double().tolist() == want
            checked += 1
    assert checked > 20


def test_per_bit_batchnorm_running_stats_follow_the_active_width():
    """One compiled training step updates exactly the active width's BN statistics, as eager."""
    torch._dynamo.reset()
    net = _net(NESTED, per_bit_bn=True).train()
    twin = copy.deepcopy(net)
    counter = GraphCounter()
    compiled = torch.compile(net, backend=counter.backend)
    x = torch.randn(5, 1, 8, 8)
    for bits in (2, 4, 3):
        cfg = SubnetConfig.uniform(NESTED, net, bits, bits)
        net.set_config(cfg)
        twin.set_config(cfg)
        compiled(x)
        twin(x)
        for (name, a), b in zip(net.state_dict().items(), twin.state_dict().values()):
            if "running" in name or "num_batches" in name:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert counter.forward_graphs == 1


@pytest.mark.slow
@requires_cpp
def test_inductor_kernel_backward_matches_plain_op_backward(monkeypatch):
    """Inductor (not the counting backend), activations channels-last: the activation
    quantizers' step-size sums by the kernel, dx fused into the batch-norm backward, against
    the same graph with that backward as plain ops (checked against the oracle above). Against
    eager mode a comparison would not hold: inductor reorders the batch-norm sums, and a
    rounding difference at a grid midpoint moves an activation by a whole step."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 3),
    )
    space = ElasticSpace(w_bits=(2, 4, 8), a_bits=(2, 4, 8), a_symmetries=("sym", "asym"))
    net = eqnet.convert(model, space, keep_first_last="elastic")
    eqnet.calibrate(net, [(torch.randn(8, 3, 6, 6), None)], batches=1, method="lsq")
    net.train()
    x = torch.randn(4, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(5)
    cfgs = [SubnetConfig.random(space, net, generator=gen) for _ in range(3)]
    results = {}
    for inline in (False, True):
        torch._dynamo.reset()
        monkeypatch.setattr(form_data, "INLINE_BACKWARD", inline)
        compiled = torch.compile(copy.deepcopy(net))
        results[inline] = [_step(compiled, x, [cfgs[0]], compiled._orig_mod)]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        results[inline] += [_step(compiled, x, [c], compiled._orig_mod) for c in cfgs[1:]]
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no recompile
    for (got, got_grads), (want, want_grads) in zip(results[False], results[True]):
        assert torch.equal(got[0], want[0])
        assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-4, atol=1e-6)
