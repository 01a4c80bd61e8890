"""lowbit_linear / lowbit_conv2d against float64 oracles written from DESIGN.md's equations:
the weight is `(floor(q_n / 2^k) + c_k - z_w) * 2^k s_n`, integer activations are
`(xq - z_a) * s_a` with `xq` computed exactly as fake_quant's forward (`fl32(x * fl32(1/s))`,
round half to even, + round(z), clamp), and integer convolution pads with real zero.
The backend tests also take the `device` fixture: the torch and cuda backends run on CUDA
tensors when a GPU is there (marked `gpu`), checked against the same oracles on the CPU."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import LOWBIT_BACKENDS, LOWBIT_ISAS, call_on, lowbit_backend, need_kernel, on
from plane_oracle import pack_planes as pack

import eqkernels as E
from eqkernels import _ext
from eqkernels.backend import force_cpu_isa

ISAS = LOWBIT_ISAS
BACKENDS = LOWBIT_BACKENDS


def run_on(backend):
    return lowbit_backend(backend, "lowbit_gemm_int_cpu")


def weight64(q, n, b, scale, compensate, zw=None):
    k = n - b
    qb = torch.floor(q.to(torch.float64) / 2.0**k)
    c = 0.5 * (1 - 2.0**-k) if (compensate and k > 0) else 0.0
    w = qb + c
    if zw is not None:
        w = w - zw.to(torch.float64).reshape(-1, 1)
    return w * (2.0**k * scale.to(torch.float64).reshape(-1, 1))


def act_codes64(x, s, z, qmin, qmax):
    inv = torch.tensor(1.0, dtype=torch.float32) / s.reshape(()).to(torch.float32)
    v = (x.to(torch.float32) * inv).to(torch.float64)
    zr = torch.round(z.reshape(()).to(torch.float64)) if z is not None else 0.0
    return torch.clamp(torch.round(v) + zr, qmin, qmax), zr


def outputs_at_thread_counts(isa, run):
    """run() at 1 and then 2 torch threads, at most at ISA level `isa`."""
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with force_cpu_isa(isa):
                outs.append(run())
    finally:
        torch.set_num_threads(before)
    return outs


def assert_close_to(y, ref, bound, rel):
    err = (y.to(torch.float64) - ref).abs()
    assert torch.all(err <= rel * bound + 1e-30), float((err / (bound + 1e-30)).max())


ACT_RANGES = [(None, None), (-128, 127), (0, 255), (-127, 127), (0, 15)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACT_RANGES)
@pytest.mark.parametrize(
    "M,N,K,n,b",
    [(1, 5, 97, 4, 2), (3, 70, 33, 8, 8), (17, 9, 300, 8, 3), (1, 1, 1, 1, 1), (5, 33, 64, 6, 6)],
)
def test_linear(backend, act, M, N, K, n, b, device):
    name, ctx = run_on(backend)
    qmin, qmax = act
    q = torch.randint(-(1 << (n - 1)), 1 << (n - 1), (N, K))
    planes = pack(q, n)
    x = torch.randn(M, K) * 3
    for per_channel in (False, True):
        for compensate in (True, False):
            scale = torch.rand(N) + 0.05 if per_channel else torch.tensor([0.07])
            bias = torch.randn(N) if per_channel else None
            kwargs = {}
            w = weight64(q, n, b, scale, compensate)
            if qmin is None:
                ref = x.double() @ w.T
                bound = x.double().abs() @ w.abs().T
            else:
                s_a = torch.tensor([0.05])
                z_a = torch.tensor([3.4 if qmin >= 0 else -2.6])
                kwargs = dict(act_scale=s_a, act_zero_point=z_a, act_quant_min=qmin,
                              act_quant_max=qmax)  # fmt: skip
                xq, zr = act_codes64(x, s_a, z_a, qmin, qmax)
                xd = (xq - zr) * s_a.double()
                ref = xd @ w.T
                bound = xd.abs() @ w.abs().T
            if bias is not None:
                ref = ref + bias.double()
                bound = bound + bias.double().abs()
            with ctx():
                y = call_on(device, E.lowbit_linear, x, planes, scale, b, n, K=K,
                            compensate=compensate, bias=bias, backend=name, **kwargs)  # fmt: skip
            assert y.shape == (M, N) and y.dtype == torch.float32
            # Integer path: exact up to the float epilogue; float path: fp32 GEMM error.
            rel = 1e-6 if qmin is not None else 4e-6 * max(1.0, K**0.5)
            assert_close_to(y, ref, bound, rel)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", [(None, None), (-128, 127), (0, 255)])
def test_linear_weight_zero_point_leading_dims_noncontiguous(backend, act, device):
    name, ctx = run_on(backend)
    qmin, qmax = act
    N, K, n = 6, 45, 4
    q = torch.randint(-8, 8, (N, K))
    planes = pack(q, n)
    zw = torch.randint(-3, 4, (N,))
    scale = torch.rand(N) + 0.1
    x = (torch.randn(2, K, 3) * 2).to(device).transpose(1, 2)  # [2, 3, K], non-contiguous
    w = weight64(q, n, n, scale, True, zw)
    kwargs = {}
    if qmin is None:
        xd = x.double()
    else:
        s_a, z_a = torch.tensor([0.03]), torch.tensor([1.0 if qmin < 0 else 100.0])
        kwargs = dict(act_scale=s_a, act_zero_point=z_a, act_quant_min=qmin, act_quant_max=qmax)
        xq, zr = act_codes64(x.cpu(), s_a, z_a, qmin, qmax)
        xd = (xq - zr) * s_a.double()
    ref = xd @ w.T
    with ctx():
        y = call_on(device, E.lowbit_linear, x, planes, scale, n, n, K=K, weight_zero_point=zw,
                    backend=name, **kwargs)  # fmt: skip
    assert y.shape == (2, 3, N)
    assert_close_to(y, ref, xd.abs() @ w.abs().T, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp-avx512gfni", "cpp-avx512", "cpp-avx2"])
@pytest.mark.parametrize("act", [(0, 255), (-128, 127)])
def test_linear_k_chunking(backend, act):
    """8-bit weights at the extremes with K beyond the int32-exact length."""
    name, ctx = run_on(backend)
    qmin, qmax = act
    K = 70_000 if qmin >= 0 else 140_000
    N = 2
    q = torch.full((N, K), -128)
    q[1, ::3] = 127
    planes = pack(q, 8)
    x = torch.full((1, K), 1e6) if qmin >= 0 else torch.full((1, K), -1e6)
    s_a = torch.tensor([1.0])
    scale = torch.tensor([2.0**-20])
    with ctx():
        y = E.lowbit_linear(x, planes, scale, 8, 8, K=K, act_scale=s_a, act_quant_min=qmin,
                            act_quant_max=qmax, backend=name)  # fmt: skip
    xq, _ = act_codes64(x, s_a, None, qmin, qmax)
    acc = xq @ q.double().T
    assert acc.abs().max() >= 2**31  # the test really exceeds int32
    assert torch.equal(y.double(), (acc * 2.0**-20).float().double())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("M,N,K,bits", [(1, 67, 200, 2), (1, 16, 1024, 8), (2, 5, 65, 3),
                                        (20, 37, 129, 4), (64, 8, 96, 1), (7, 130, 32, 7)])  # fmt: skip
def test_raw_int_accumulators_exact(isa, signed, M, N, K, bits):
    """The _C accumulators sum_k xq*q_b, exact, on every ISA path."""
    need_kernel("lowbit_gemm_int_cpu")
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K))
    if signed:
        xq = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    else:
        xq = torch.randint(0, 256, (M, K), dtype=torch.uint8)
    expect = (xq.double() @ q.double().T).to(torch.int64)
    with force_cpu_isa(isa):
        from eqkernels.backend import cpu_isa_cap

        got = _ext.kernel("lowbit_gemm_int_cpu")(xq, pack(q, bits), bits, cpu_isa_cap())
        assert got.dtype == torch.int32
        assert torch.equal(got.to(torch.int64), expect)
        rows = _ext.kernel("bitplane_rowsums_cpu")(pack(q, bits), bits, K)
    assert torch.equal(rows.to(torch.int64), q.sum(1))


# --------------------------------------------------------------------------------------------
# Tiled planes (ISA level avx512gfni): 8-row tiles, 64-column blocks, 2048-column chunks of the
# M >= 2 kernel, its 2-row register blocking and the one-row GEMV.

TILED_CASES = [
    # M, N, K
    (1, 13, 65),
    (1, 70, 4100),  # GEMV across many blocks, N not a multiple of 8
    (2, 8, 64),
    (3, 9, 2049),  # one row past the 2-row blocking, K one column into a second chunk
    (17, 70, 4100),  # three chunks, the last of one block
    (5, 1, 1),
]


def has_tiled_path():
    return _ext.has_kernel("lowbit_pack_weights_cpu") and _ext.kernel("bitplanes_cpu_isa")(-1) >= 3


@pytest.mark.parametrize("M,N,K", TILED_CASES)
@pytest.mark.parametrize("act", [(-128, 127), (0, 255), (0, 15)])
def test_tiled_linear_blocking(M, N, K, act):
    if not has_tiled_path():
        pytest.skip("this CPU lacks AVX-512 VBMI + GFNI (the tiled-plane path)")
    qmin, qmax = act
    n = 8
    q = torch.randint(-(1 << (n - 1)), 1 << (n - 1), (N, K))
    q[0, : min(K, 40)] = -128  # the extreme codes, on every width
    planes = pack(q, n)
    x = torch.randn(M, K) * 3
    s_a = torch.tensor([0.05])
    z_a = torch.tensor([3.4 if qmin >= 0 else -2.6])
    xq, zr = act_codes64(x, s_a, z_a, qmin, qmax)
    xd = (xq - zr) * s_a.double()
    scale = torch.rand(N) + 0.05
    for b in range(1, n + 1):
        with force_cpu_isa("avx512gfni"):
            y = E.lowbit_linear(x, planes, scale, b, n, K=K, act_scale=s_a, act_zero_point=z_a,
                                act_quant_min=qmin, act_quant_max=qmax, backend="cpp")  # fmt: skip
        w = weight64(q, n, b, scale, True)
        assert_close_to(y, xd @ w.T, xd.abs() @ w.abs().T, 1e-6)


def test_tiled_planes_layout():
    """The kernel layout keeps the first `bits` planes separate and MSB first: tile word
    [j, t, kb, r] holds columns 64kb..64kb+63 of row 8t+r of plane j, zero past N and K."""
    if not has_tiled_path():
        pytest.skip("this CPU lacks AVX-512 VBMI + GFNI (the tiled-plane path)")
    N, K, bits = 13, 100, 5
    q = torch.randint(-16, 16, (N, K))
    planes = pack(q, bits)
    tiled = _ext.ext().PACKED_LAYOUTS["tiled"]
    tiles, wsum = _ext.kernel("lowbit_pack_weights_cpu")(planes[:3].contiguous(), 3, K, K, 1, 1,
                                                         1, tiled, -1)  # fmt: skip
    W = planes.shape[2]
    words = planes[:3].to(torch.int64) & 0xFFFFFFFF  # [3, N, W] as unsigned
    words = F.pad(words, (0, 4 - W, 0, 16 - N))  # 2 blocks of 64 columns, 2 tiles of 8 rows
    # int64 shifts wrap, so this is the uint64 word's bit pattern, as the kernel stores it
    expect = (words[..., 0::2] | (words[..., 1::2] << 32)).view(3, 2, 8, 2).transpose(2, 3)
    assert tiles.dtype == torch.int64 and tuple(tiles.shape) == (3, 2, 2, 8)
    assert torch.equal(tiles, expect)
    assert torch.equal(wsum, torch.floor(q / 4).to(torch.int64).sum(1))


def conv_oracle(x, q, n, b, scale, compensate, act, stride, padding, dilation, groups, bias):
    N = q.shape[0]
    cin_g = x.shape[1] // groups
    w = weight64(q, n, b, scale, compensate).view(N, cin_g, *KS)
    if act is None:
        xd = x.double()
    else:
        s_a, z_a, qmin, qmax = act
        xq, zr = act_codes64(x, s_a, z_a, qmin, qmax)
        xd = (xq - zr) * s_a.double()  # padding with z_a is padding xd with 0
    ref = F.conv2d(xd, w, bias.double() if bias is not None else None, stride, padding,
                   dilation, groups)  # fmt: skip
    bound = F.conv2d(xd.abs(), w.abs(), bias.double().abs() if bias is not None else None,
                     stride, padding, dilation, groups)  # fmt: skip
    return ref, bound


KS = (3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cin,cout,groups,stride,padding,dilation",
    [(4, 6, 1, 1, 1, 1), (4, 6, 2, 2, 1, 1), (6, 6, 6, 1, 2, 2), (3, 5, 1, (2, 1), (0, 2), 1),
     (16, 16, 16, 2, 1, 1)],
)  # fmt: skip
@pytest.mark.parametrize("act", [None, "signed", "unsigned"])
def test_conv2d(backend, cin, cout, groups, stride, padding, dilation, act, device):
    name, ctx = run_on(backend)
    n, b = 4, 3
    K = cin // groups * 9
    q = torch.randint(-8, 8, (cout, K))
    planes = pack(q, n)
    x = torch.randn(2, cin, 7, 6) * 2
    scale = torch.rand(cout) + 0.1
    bias = torch.randn(cout)
    kwargs, a = {}, None
    if act == "signed":
        a = (torch.tensor([0.04]), torch.tensor([-5.0]), -128, 127)
    elif act == "unsigned":
        a = (torch.tensor([0.04]), torch.tensor([120.3]), 0, 255)  # real zero is code 120
    if a is not None:
        kwargs = dict(act_scale=a[0], act_zero_point=a[1], act_quant_min=a[2], act_quant_max=a[3])
    ref, bound = conv_oracle(x, q, n, b, scale, True, a, stride, padding, dilation, groups, bias)
    with ctx():
        y = call_on(device, E.lowbit_conv2d, x, planes, scale, b, n, in_channels=cin,
                    kernel_size=3, stride=stride, padding=padding, dilation=dilation,
                    groups=groups, bias=bias, backend=name, **kwargs)  # fmt: skip
    assert y.shape == ref.shape
    assert_close_to(y, ref, bound, 1e-6 if act else 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv2d_zero_point_padding_at_borders(backend, device):
    """A zero input with a large activation zero point: every output, borders included, is
    exactly the bias (code-0 padding would give nonzero borders)."""
    name, ctx = run_on(backend)
    q = torch.randint(-8, 8, (3, 2 * 9))
    x = torch.zeros(1, 2, 5, 5)
    bias = torch.tensor([0.5, -1.0, 2.0])
    with ctx():
        y = call_on(device, E.lowbit_conv2d, x, pack(q, 4), torch.tensor([0.1]), 4, 4,
                    in_channels=2, kernel_size=3, padding=2, bias=bias,
                    act_scale=torch.tensor([0.1]), act_zero_point=torch.tensor([128.0]),
                    act_quant_min=0, act_quant_max=255, backend=name)  # fmt: skip
    assert torch.equal(y, bias.view(1, 3, 1, 1).expand(1, 3, 7, 7))


def test_bad_arguments():
    q = torch.randint(-8, 8, (4, 40))
    planes = pack(q, 4)
    x = torch.randn(2, 40)
    s = torch.tensor([0.1])

    def call(**kw):
        args = dict(x=x, planes=planes, scale=s, bits=2, top_bits=4, K=40)
        args.update(kw)
        return E.lowbit_linear(args.pop("x"), args.pop("planes"), args.pop("scale"),
                               args.pop("bits"), args.pop("top_bits"), **args)  # fmt: skip

    cases = [
        (dict(bits=0), "bits="),
        (dict(bits=5, top_bits=8), "bits=5"),
        (dict(top_bits=1), "top_bits="),
        (dict(K=41), "K=41|x: last"),
        (dict(x=x.long()), "x: expected"),
        (dict(scale=torch.tensor([0.1, 0.2])), "scale:"),
        (dict(scale=torch.tensor([-0.1])), "scale:"),
        (dict(bias=torch.randn(3)), "bias:"),
        (dict(weight_zero_point=torch.tensor([0.5] * 4)), "weight_zero_point"),
        (dict(act_zero_point=torch.tensor([1.0])), "act_zero_point"),
        (dict(act_scale=s, act_quant_min=0), "act_quant_max"),
        (dict(act_scale=s, act_quant_min=0, act_quant_max=256), "act_quant_max=256"),
        (dict(act_scale=s, act_quant_min=-129, act_quant_max=127), "act_quant_min=-129"),
        (dict(act_scale=s, act_quant_min=5, act_quant_max=5), "act_quant_min < act_quant_max"),
        (dict(act_scale=torch.tensor([0.0]), act_quant_min=0, act_quant_max=255), "act_scale"),
        (dict(backend="gpu"), "backend="),
    ]
    for kw, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**kw)
    xc = torch.randn(1, 4, 5, 5)
    pc = pack(torch.randint(-8, 8, (6, 18)), 4)
    conv_cases = [
        (dict(groups=3), "groups="),
        (dict(kernel_size=0), "kernel_size="),
        (dict(stride=(1, 0)), "stride="),
        (dict(padding=-1), "padding="),
        (dict(padding="same"), "padding="),
        (dict(in_channels=6), "x: shape"),
        (dict(kernel_size=7), "smaller than|does not match"),
    ]
    for kw, match in conv_cases:
        args = dict(in_channels=4, kernel_size=3, groups=2)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            E.lowbit_conv2d(xc, pc, s, 4, 4, **args)
    with pytest.raises(ValueError, match="layout"):
        tagged = planes.clone()
        tagged.eqk_layout = "avx512_tiles"
        call(planes=tagged)


def test_opcheck():
    import eqkernels.ops.lowbit_gemm  # noqa: F401  (registers the ops when run alone)

    q = torch.randint(-8, 8, (5, 40))
    planes = pack(q, 4)
    x = torch.randn(3, 40)
    s = torch.tensor([0.1])
    required = os.environ.get("EQK_REQUIRE_EXT") == "1"
    backends = ["torch"] + (["cpp"] if required or _ext.has_kernel("lowbit_gemm_int_cpu") else [])
    for name in backends:
        for act in ((None, None, None, None), (torch.tensor([0.05]), torch.tensor([2.0]), 0, 255)):
            args = (x, planes, s, 3, 4, 40, True, None, None, *act, name)
            torch.library.opcheck(torch.ops.eqk.lowbit_linear.default, args)
            xc = torch.randn(1, 4, 5, 5)
            cplanes = pack(q[:, :36], 4)
            cargs = (xc, cplanes, s, 3, 4, 4, [3, 3], [1, 1], [1, 1], [1, 1], 1, True, None,
                     None, *act, name)  # fmt: skip
            torch.library.opcheck(torch.ops.eqk.lowbit_conv2d.default, cargs)


def test_graph_capture_and_fake_tensors_see_the_registered_ops():
    """Eager CPU calls skip the custom op's dispatch; fake tensors, dispatch modes and
    torch.compile must still reach the registered op (and agree with eager)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randint(-8, 8, (6, 40))
    planes, s = pack(q, 4), torch.tensor([0.1])
    act = dict(act_scale=torch.tensor([0.05]), act_quant_min=0, act_quant_max=255)
    x = torch.randn(2, 40)
    eager = E.lowbit_linear(x, planes, s, 3, 4, K=40, backend="torch", **act)
    with FakeTensorMode() as mode:
        fake = E.lowbit_linear(mode.from_tensor(x), mode.from_tensor(planes),
                               mode.from_tensor(s), 3, 4, K=40, backend="torch",
                               act_scale=mode.from_tensor(act["act_scale"]), act_quant_min=0,
                               act_quant_max=255)  # fmt: skip
    assert fake.shape == (2, 6)
    with FlopCounterMode(display=False):
        assert torch.equal(E.lowbit_linear(x, planes, s, 3, 4, K=40, backend="torch", **act), eager)

    def f(x):
        return E.lowbit_linear(x, planes, s, 3, 4, K=40, backend="torch", **act)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, fullgraph=True, backend="eager")(x), eager)


@pytest.mark.parametrize("isa", ISAS)
def test_cpp_results_do_not_depend_on_thread_count(isa):
    """Float sums run in a fixed order inside one thread; integer sums are exact."""
    need_kernel("lowbit_gemm_float_cpu")
    q = torch.randint(-8, 8, (300, 333))
    planes = pack(q, 4)
    x = torch.randn(3, 333)
    act = dict(act_scale=torch.tensor([0.02]), act_zero_point=torch.tensor([1.0]),
               act_quant_min=-128, act_quant_max=127)  # fmt: skip
    outs = outputs_at_thread_counts(
        isa,
        lambda: (
            E.lowbit_linear(x, planes, torch.tensor([0.1]), 3, 4, K=333, backend="cpp"),
            E.lowbit_linear(x, planes, torch.tensor([0.1]), 3, 4, K=333, backend="cpp", **act),
        ),
    )
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# --------------------------------------------------------------------------------------------
# The fused C++ integer path (quantize + integer GEMM + epilogue in one call, weights repacked
# once per planes tensor): shapes that cross its blocking (64-position blocks, 4-row and
# 16-channel tiles, K not a multiple of 4), groups, channel multipliers, the repack cache and
# the fallback for a zero point outside the code range.

FUSED_CONV_CASES = [
    # B, cin, cout, H, W, k, groups, stride, padding, dilation
    (2, 5, 70, 13, 11, 3, 1, 1, 1, 1),  # 143 positions, 5 channel tiles, K = 45
    (1, 8, 36, 9, 9, 3, 2, 2, 1, 1),  # groups with 4 input channels each
    (1, 3, 7, 10, 10, (1, 5), 1, (1, 2), (0, 2), (1, 2)),
    (2, 4, 8, 6, 7, 3, 4, 1, 1, 2),  # channel multiplier 2 (cin/groups == 1)
    (1, 64, 64, 8, 8, 3, 1, 1, 1, 1),  # a ResNet stage shape
]


@pytest.mark.parametrize("backend", [f"cpp-{isa}" for isa in ISAS])
@pytest.mark.parametrize("case", FUSED_CONV_CASES)
@pytest.mark.parametrize("act", ["signed", "unsigned"])
@pytest.mark.parametrize("b", [4, 8])  # 8: codes down to -128 (AVX2 takes the portable loop)
def test_conv2d_fused_blocking(backend, case, act, b):
    name, ctx = run_on(backend)
    assert _ext.has_kernel("lowbit_conv2d_int_fused_cpu")  # the path under test exists
    B, cin, cout, H, W, ks, groups, stride, padding, dilation = case
    ks = (ks, ks) if isinstance(ks, int) else ks
    n = 8
    K = cin // groups * ks[0] * ks[1]
    q = torch.randint(-128, 128, (cout, K))
    planes = pack(q, n)
    x = torch.randn(B, cin, H, W) * 2
    scale = torch.rand(cout) + 0.1
    bias = torch.randn(cout)
    if act == "signed":
        a = (torch.tensor([0.03]), torch.tensor([7.0]), -128, 127)
    else:
        a = (torch.tensor([0.03]), torch.tensor([131.0]), 0, 255)
    s_a, z_a, qmin, qmax = a
    xq, zr = act_codes64(x, s_a, z_a, qmin, qmax)
    xd = (xq - zr) * s_a.double()
    w = weight64(q, n, b, scale, True).view(cout, cin // groups, *ks)
    ref = F.conv2d(xd, w, bias.double(), stride, padding, dilation, groups)
    bound = F.conv2d(xd.abs(), w.abs(), bias.double().abs(), stride, padding, dilation, groups)
    with ctx():
        y = E.lowbit_conv2d(x, planes, scale, b, n, in_channels=cin, kernel_size=ks,
                            stride=stride, padding=padding, dilation=dilation, groups=groups,
                            bias=bias, act_scale=s_a, act_zero_point=z_a, act_quant_min=qmin,
                            act_quant_max=qmax, backend=name)  # fmt: skip
    assert y.shape == ref.shape
    assert_close_to(y, ref, bound, 1e-6)


@pytest.mark.parametrize("backend", [f"cpp-{isa}" for isa in ISAS])
def test_conv2d_zero_point_outside_code_range(backend):
    """A rounded zero point above act_quant_max: the padding code is not a code of the range
    (the fused path declines; the result still pads with real zero)."""
    name, ctx = run_on(backend)
    q = torch.randint(-8, 8, (4, 3 * 9))
    x = torch.rand(1, 3, 5, 5)
    s_a, z_a = torch.tensor([0.1]), torch.tensor([20.0])
    scale = torch.tensor([0.2])
    with ctx():
        y = E.lowbit_conv2d(x, pack(q, 4), scale, 4, 4, in_channels=3, kernel_size=3,
                            padding=1, act_scale=s_a, act_zero_point=z_a, act_quant_min=0,
                            act_quant_max=15, backend=name)  # fmt: skip
    xq, zr = act_codes64(x, s_a, z_a, 0, 15)
    xd = (xq - zr) * s_a.double()
    w = weight64(q, 4, 4, scale, True).view(4, 3, 3, 3)
    ref = F.conv2d(xd, w, None, 1, 1)
    assert_close_to(y, ref, F.conv2d(xd.abs(), w.abs(), None, 1, 1), 1e-6)


@pytest.mark.parametrize("backend", [f"cpp-{isa}" for isa in ISAS])
def test_repacked_weights_follow_in_place_plane_changes(backend):
    """The kernel-layout weights are cached per planes tensor: writing new codes into the same
    tensor must give the new layer's results, for linear (few and many rows) and conv."""
    name, ctx = run_on(backend)
    s_a = torch.tensor([0.05])
    act = dict(act_scale=s_a, act_zero_point=torch.tensor([2.0]), act_quant_min=-128,
               act_quant_max=127)  # fmt: skip
    scale = torch.tensor([0.1])
    q1 = torch.randint(-8, 8, (20, 36))
    planes = pack(q1, 4)
    xl = torch.randn(17, 36)
    xc = torch.randn(1, 4, 6, 6)
    for step in range(2):
        q = q1 if step == 0 else torch.randint(-8, 8, (20, 36))
        if step == 1:
            planes.copy_(pack(q, 4))
        w = weight64(q, 4, 4, scale, True)
        for rows in (2, 17):
            with ctx():
                y = E.lowbit_linear(xl[:rows], planes, scale, 4, 4, K=36, backend=name, **act)
            xq, zr = act_codes64(xl[:rows], s_a, act["act_zero_point"], -128, 127)
            xd = (xq - zr) * s_a.double()
            assert_close_to(y, xd @ w.T, xd.abs() @ w.abs().T, 1e-6)
        with ctx():
            y = E.lowbit_conv2d(xc, planes, scale, 4, 4, in_channels=4, kernel_size=3,
                                padding=1, backend=name, **act)  # fmt: skip
        xq, zr = act_codes64(xc, s_a, act["act_zero_point"], -128, 127)
        xd = (xq - zr) * s_a.double()
        wc = w.view(20, 4, 3, 3)
        assert_close_to(y, F.conv2d(xd, wc, None, 1, 1), F.conv2d(xd.abs(), wc.abs(), None, 1, 1),
                        1e-6)  # fmt: skip


@pytest.mark.parametrize("isa", ISAS)
def test_fused_conv_and_linear_do_not_depend_on_thread_count(isa):
    need_kernel("lowbit_gemm_int_cpu")
    q = torch.randint(-8, 8, (64, 64 * 9))
    planes = pack(q, 4)
    x = torch.randn(2, 64, 16, 16)
    xl = torch.randn(40, 64 * 9)
    act = dict(act_scale=torch.tensor([0.02]), act_zero_point=torch.tensor([3.0]),
               act_quant_min=0, act_quant_max=255)  # fmt: skip
    outs = outputs_at_thread_counts(
        isa,
        lambda: (
            E.lowbit_conv2d(x, planes, torch.tensor([0.1]), 3, 4, in_channels=64,
                            kernel_size=3, padding=1, backend="cpp", **act),
            E.lowbit_linear(xl, planes, torch.tensor([0.1]), 3, 4, K=64 * 9, backend="cpp",
                            **act),
        ),
    )  # fmt: skip
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_prepared_calls(backend, device):
    """prepare_conv2d / prepare_linear (validated once, used by the deploy runtime) against the
    float64 oracles, and equal to the public ops bit for bit, call after call."""
    name, ctx = run_on(backend)
    q = torch.randint(-8, 8, (6, 4 * 9))
    planes = pack(q, 4)
    scale, s_a, z_a = torch.rand(6) + 0.1, torch.tensor([0.05]), torch.tensor([3.0])
    bias = torch.randn(6)
    planes_d, scale_d, s_a_d, z_a_d, bias_d = on(device, planes, scale, s_a, z_a, bias)
    act = E.ActQuant(s_a_d, z_a_d, 0, 255)
    x = torch.randn(2, 4, 5, 6)
    geom = dict(in_channels=4, kernel_size=3, stride=(1, 2), padding=1)
    with ctx():
        conv = E.prepare_conv2d(planes_d, scale_d, 3, 4, **geom, bias=bias_d, act=act,
                                backend=name)  # fmt: skip
        y = call_on(device, conv, x)
        again = call_on(device, conv, x)
        public = call_on(device, E.lowbit_conv2d, x, planes_d, scale_d, 3, 4, **geom,
                         bias=bias_d, act_scale=s_a_d, act_zero_point=z_a_d, act_quant_min=0,
                         act_quant_max=255, backend=name)  # fmt: skip
    ref, bound = conv_oracle(x, q, 4, 3, scale, True, (s_a, z_a, 0, 255), (1, 2), 1, 1, 1, bias)
    assert_close_to(y, ref, bound, 1e-6)
    assert torch.equal(y, again) and torch.equal(y, public)
    assert conv.backend == name and conv.K == 36 and conv.out_channels == 6
    xl = torch.randn(3, 36)
    with ctx():
        lin = E.prepare_linear(planes_d, scale_d, 3, 4, K=36, bias=bias_d, act=act, backend=name)
        y = call_on(device, lin, xl)
        float_lin = E.prepare_linear(planes_d, scale_d, 3, 4, K=36, backend=name)
        yf = call_on(device, float_lin, xl)  # float activations
    xq, zr = act_codes64(xl, s_a, z_a, 0, 255)
    xd = (xq - zr) * s_a.double()
    w = weight64(q, 4, 3, scale, True)
    assert_close_to(y, xd @ w.T + bias.double(), xd.abs() @ w.abs().T + bias.double().abs(), 1e-6)
    assert_close_to(yf, xl.double() @ w.T, xl.double().abs() @ w.abs().T, 1e-6)


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_fused_linear_at_the_decoded_rows_threshold(isa):
    """The fused linear switches kernels at _C.LOWBIT_DECODED_MIN_M rows (bit-serial GEMV
    below, decoded int8 GEMM from there): both sides of the threshold match the oracle."""
    need_kernel("lowbit_linear_int_fused_cpu")
    min_m = _ext.ext().LOWBIT_DECODED_MIN_M
    q = torch.randint(-128, 128, (19, 70))
    planes = pack(q, 8)
    scale, s_a = torch.rand(19) + 0.1, torch.tensor([0.03])
    w = weight64(q, 8, 6, scale, True)
    for M in (min_m - 1, min_m):
        x = torch.randn(M, 70)
        with force_cpu_isa(isa):
            y = E.lowbit_linear(x, planes, scale, 6, 8, K=70, act_scale=s_a, act_quant_min=-128,
                                act_quant_max=127, backend="cpp")  # fmt: skip
        xq, _ = act_codes64(x, s_a, None, -128, 127)
        xd = xq * s_a.double()
        assert_close_to(y, xd @ w.T, xd.abs() @ w.abs().T, 1e-6)


def test_act_quant_and_prepared_calls_reject_bad_arguments():
    planes = pack(torch.randint(-8, 8, (6, 36)), 4)
    scale = torch.rand(6) + 0.1
    with pytest.raises(ValueError, match=r"act_scale: accepted values are finite and >= 2\^-126"):
        E.ActQuant(torch.tensor([0.0]), None, 0, 255)
    with pytest.raises(ValueError, match="act_quant_max=256"):
        E.ActQuant(0.1, None, 0, 256)
    with pytest.raises(ValueError, match="act_quant_min=-129"):
        E.ActQuant(0.1, None, -129, 127)
    with pytest.raises(ValueError, match="scale: expected"):
        E.ActQuant(None, None, 0, 255)
    act = E.ActQuant(0.1, 2, 0, 255)  # Python numbers become fp32 [1] tensors
    assert act.scale.dtype == torch.float32 and act.zero_point.tolist() == [2.0]
    with pytest.raises(ValueError, match="act: expected None"):
        E.prepare_linear(planes, scale, 3, 4, K=36, act=(0.1, None, 0, 255))
    with pytest.raises(ValueError, match=r"top_bits=4: accepted values are integers 5..8"):
        E.prepare_linear(planes, scale, 5, 4, K=36)
    with pytest.raises(ValueError, match="groups=4: accepted values divide the output channels"):
        E.prepare_conv2d(planes, scale, 3, 4, in_channels=16, kernel_size=3, groups=4)
    lin = E.prepare_linear(planes, scale, 3, 4, K=36, act=act, backend="torch")
    with pytest.raises(ValueError, match="x: last dimension 35; accepted: K=36"):
        lin(torch.randn(2, 35))
    with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
        lin(torch.zeros(2, 36, dtype=torch.int32))
    conv = E.prepare_conv2d(planes, scale, 3, 4, in_channels=4, kernel_size=3, backend="torch")
    with pytest.raises(ValueError, match="x: shape"):
        conv(torch.randn(1, 3, 5, 5))
    with pytest.raises(ValueError, match="x: height 2 is smaller than the dilated kernel"):
        conv(torch.randn(1, 4, 2, 5))
