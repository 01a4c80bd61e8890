"""A step list over numbered buffers executed in one C++ call (`eqkernels._C.StepProgramCpu`,
csrc/runtime/step_program_cpu.cpp): prepared low-bit convs and linears (the fused C++ integer
path: activation quantization, integer GEMM, float epilogue) and the float steps between them.

```python
prog = E.StepProgram()
h = prog.conv(prepared_conv, prog.input)      # a PreparedConv2d with integer activations
h = prog.relu(h)
h = prog.adaptive_avg_pool2d(h, (1, 1))
h = prog.linear(prepared_linear, prog.flatten(h, 1))
prog.finish(h)
y = prog(x)  # one C++ call; None when it cannot run this x (see __call__)
```

Each method appends one step reading earlier buffers and returns the buffer it writes; the
C++ side validates every step as it is added (a program is a DAG in execution order; kinds,
buffer ids, tensor counts, dtypes and shapes are checked), so a hostile list raises at once.
`step(kind, inputs, ...)` is the generic form the typed methods call (`StepProgram.kinds()`
lists the kinds, `eqkernels._C.STEP_KINDS`). A list of ops is not a model: the caller decides what it computes.

A conv step may store the next conv's activation codes instead of fp32 (`conv(codes_for=)`,
one byte per value, quantized in its epilogue exactly as the consumer would and laid out in the
consumer's padded channels-last form, so the consumer skips its quantize pass).

Results equal the per-layer calls bit for bit: the quantized steps run the same C++ kernels
as the prepared calls (`PreparedConv2d` / `PreparedLinear` on the cpp backend), the float
steps the same ATen functions as `torch.nn.functional`.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..backend import cpu_isa_cap
from ._lowbit_gemm_fused import FUSED_CONV, FUSED_LINEAR, conv_weights, int32_exact, linear_weights
from ._lowbit_gemm_register import run_eagerly
from ._lowbit_gemm_weights import compensation
from .lowbit_gemm import PreparedConv2d

__all__ = ["StepProgram"]

MAX_BUFFERS = 1 << 16


def _pair(v, name):
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return t


def _act_tensors(act):
    return act.scale.reshape(1).to(torch.float32), (
        None if act.zero_point is None else act.zero_point.reshape(1).to(torch.float32)
    )


def _quantized_why_not(prepared, kernel) -> str | None:
    """Why a prepared call cannot be a quantized step (None: it can)."""
    if prepared.backend != "cpp":
        return f"backend {prepared.backend!r} (the step executor runs the cpp backend only)"
    if prepared.act is None:
        return "float activations (weight-only layers have no fused integer kernel)"
    if prepared.device.type != "cpu":
        return f"weights on {prepared.device}"
    if not _ext.has_kernel(kernel):
        return f"eqkernels._C has no {kernel}"
    z = 0.0 if prepared.act.zero_point is None else float(prepared.act.zero_point.reshape(()))
    zr = float(torch.tensor(z, dtype=torch.float32).round())
    if not prepared.act.quant_min <= zr <= prepared.act.quant_max:
        return "the activation zero point lies outside its code range"
    return None


class StepProgram:
    """A step list executed in one C++ call (module docstring). Buffer `input` (0) holds x."""

    input = 0

    def __init__(self):
        if not _ext.has_kernel("StepProgramCpu"):
            raise NotImplementedError(
                "StepProgram needs eqkernels._C built with csrc/runtime (build the extension)"
            )
        self._kinds = dict(_ext.ext().STEP_KINDS)
        self._steps: list[tuple] = []
        self._next = 1
        self._impl = self._probe = None
        self.output: int | None = None
        self._isa = cpu_isa_cap()  # the kernel weights chosen below depend on it

    @staticmethod
    def reads_codes(prepared) -> bool:
        """Whether a conv step of `prepared` can read another step's codes (`conv(codes_for=)`):
        it runs as a quantized step on the executor's own kernels (k4n16 weights, or depthwise
        with one output channel per group; channel multipliers run the per-layer op on fp32)."""
        if not isinstance(prepared, PreparedConv2d) or prepared.group_size:
            return False
        if _quantized_why_not(prepared, FUSED_CONV) is not None:
            return False
        in_channels, (kh, kw), _, _, _, groups = prepared.geometry
        cin_g = in_channels // groups
        if cin_g > 1 and not int32_exact(cin_g * kh * kw, 255, prepared.bits):
            return False
        return cin_g > 1 or prepared.out_channels == groups

    @staticmethod
    def kinds() -> list[str]:
        """The step kinds of the C++ executor."""
        return sorted(_ext.ext().STEP_KINDS)

    # ------------------------------------------------------------------ generic
    def step(self, kind: str, inputs, tensors=(), ints=(), floats=()) -> int:
        """Append a step of `kind` (one of `kinds()`) reading buffers `inputs`; returns the
        buffer it writes. Raises ValueError on a bad step (named by the C++ check)."""
        if kind not in self._kinds:
            raise ValueError(f"kind: {kind!r}; accepted: {sorted(self._kinds)}")
        if self.output is not None:
            raise ValueError("StepProgram: finish() was called; no step can be added")
        out = self._next
        entry = (self._kinds[kind], [int(i) for i in inputs], out, list(tensors),
                 [int(i) for i in ints], [float(f) for f in floats])  # fmt: skip
        self._validate(entry)
        self._steps.append(entry)
        self._next += 1
        return out

    def _validate(self, entry):
        # The C++ checks each step against the buffers written so far, in a probe program
        # with room for many buffers; finish() builds the executed one at its exact size.
        if self._probe is None:
            self._probe = _ext.ext().StepProgramCpu(MAX_BUFFERS)
        if entry[2] >= MAX_BUFFERS:
            raise ValueError(f"StepProgram: at most {MAX_BUFFERS - 1} steps")
        try:
            self._probe.add(*entry)
        except RuntimeError as exc:
            raise ValueError(str(exc).splitlines()[0]) from None

    def finish(self, output: int) -> StepProgram:
        """Mark `output` as the result; no step can be added afterwards."""
        impl = _ext.ext().StepProgramCpu(max(self._next, 1))
        for e in self._steps:
            impl.add(*e)
        try:
            impl.finish(int(output))
        except RuntimeError as exc:
            raise ValueError(str(exc).splitlines()[0]) from None
        self._impl, self.output, self._probe = impl, int(output), None
        return self

    def set_chunk_bytes(self, nbytes: int) -> None:
        """Run a batch in chunks of samples when its largest intermediate per sample (measured
        on an earlier run) times the batch exceeds `nbytes` (default 4 MiB), so that each
        step's output is still in cache when the next step reads it. Only programs whose steps
        compute every sample alone split (no float conv / linear, whose fp32 algorithm ATen
        picks by shape, no flatten or slice of dimension 0, no pad); the result is the same."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes: expected an int >= 1, got {nbytes!r}")
        if self._impl is None:
            raise ValueError("StepProgram: call finish(output) before set_chunk_bytes")
        self._impl.set_chunk_bytes(nbytes)

    def profile(self, x: torch.Tensor) -> list[tuple[str, float]]:
        """(step kind, seconds) for each step of one run on x, in order (a separate C++ entry
        point: the plain call carries no timing); empty when a quantized step met a
        non-finite input."""
        if self._impl is None:
            raise ValueError("StepProgram: call finish(output) before profiling it")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError("x: expected a float32 CPU tensor")
        seconds = self._impl.profile(x.detach(), self._isa)
        return list(zip(self._impl.step_kinds(), seconds)) if seconds else []

    def __len__(self) -> int:
        return len(self._steps)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output for x, or None where the executor does not run it and the caller runs
        its per-layer path instead: x not a plain float32 CPU tensor, graph capture or
        dispatch modes (which should see the registered ops), or a non-finite value at the
        input of a quantized step (the per-layer ops implement the NaN rule)."""
        if self._impl is None:
            raise ValueError("StepProgram: call finish(output) before running it")
        if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not run_eagerly(x):
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None
        return self._impl.run(x, self._isa)

    # ------------------------------------------------------------------ quantized steps
    def conv(
        self,
        prepared,
        src: int,
        *,
        residual: int | None = None,
        relu: bool = False,
        clamp: tuple[float, float] | None = None,
        codes_for=None,
    ) -> int:
        """A `PreparedConv2d` (cpp backend, integer activations) as one step, optionally
        followed by `+ residual` (a buffer of the output's shape) and then ReLU (`relu=True`) or
        a clamp to `clamp=(lo, hi)` (ReLU6, Hardtanh) in its epilogue (the same fp32 operations
        as separate steps); raises NotImplementedError naming why when the fused kernel does
        not run it.

        `codes_for=consumer` (a `PreparedConv2d` that can read codes, see `reads_codes`; no
        residual): the step writes the consumer's activation codes (its quantizer, in its
        padded channels-last layout) instead of fp32, the same bytes the consumer would
        compute from the fp32 output; only convs with that quantizer and padding may read the
        buffer. Raises ValueError when the output is not finite by construction (then codes
        could hide a NaN)."""
        if relu and clamp is not None:
            raise ValueError("conv step: relu and clamp exclude each other; pass one")
        if codes_for is not None and residual is not None:
            raise ValueError("conv step: codes_for excludes a residual (the add is in fp32)")
        if codes_for is not None and not self.reads_codes(codes_for):
            raise ValueError("codes_for: expected a PreparedConv2d that reads codes (reads_codes)")
        lo, hi = (0.0, 0.0) if clamp is None else (float(clamp[0]), float(clamp[1]))
        act = 2 if clamp is not None else int(relu)
        why = _quantized_why_not(prepared, FUSED_CONV)
        in_channels, (kh, kw), stride, padding, dilation, groups = prepared.geometry
        cin_g = in_channels // groups
        if why is None and prepared.group_size:
            why = "per-group weight scales"
        if why is None and cin_g > 1 and not int32_exact(cin_g * kh * kw, 255, prepared.bits):
            why = "K too long for exact int32 accumulation (the chunked path)"
        if why is not None:
            raise NotImplementedError(f"conv step: {why}")
        packed, wsum = conv_weights(prepared.planes, prepared.bits, cin_g, kh, kw, groups)
        a_s, a_z = _act_tensors(prepared.act)
        p = prepared
        c = compensation(p.top_bits - p.bits) if p.compensate else 0.0
        ints = (p.bits, p.out_channels, kh, kw, *stride, *padding, *dilation, groups,
                p.act.quant_min, p.act.quant_max, act)  # fmt: skip
        tensors = (packed, wsum, p.scale, a_s, p.weight_zero_point, p.bias, a_z)
        inputs = [src] if residual is None else [src, residual]
        floats = (float(2 ** (p.top_bits - p.bits)), c, lo, hi)
        if codes_for is None:
            return self.step("qconv", inputs, tensors, ints, floats)
        o = codes_for
        o_s, o_z = _act_tensors(o.act)
        ints = (*ints, o.act.quant_min, o.act.quant_max, *o.geometry[3])
        return self.step("qconv_codes", inputs, (*tensors, o_s, o_z), ints, floats)

    def linear(self, prepared, src: int) -> int:
        """A `PreparedLinear` (cpp backend, integer activations) as one step (the input's last
        dimension is K); raises NotImplementedError naming why when it does not apply."""
        p = prepared
        why = _quantized_why_not(p, FUSED_LINEAR)
        if why is None and p.group_size:
            why = "per-group weight scales"
        if why is None and not int32_exact(
            p.K, max(abs(p.act.quant_min), abs(p.act.quant_max)), p.bits
        ):
            why = "K too long for exact int32 accumulation (the chunked path)"
        if why is not None:
            raise NotImplementedError(f"linear step: {why}")
        kernel_weights, wsum = linear_weights(p.planes, p.bits, p.K, 1 << 30)
        a_s, a_z = _act_tensors(p.act)
        c = compensation(p.top_bits - p.bits) if p.compensate else 0.0
        planes = p.planes[: p.bits].contiguous()
        tensors = (planes, wsum, p.scale, a_s, kernel_weights, p.weight_zero_point, p.bias, a_z)
        ints = (p.bits, p.act.quant_min, p.act.quant_max)
        return self.step("qlinear", [src], tensors, ints, (float(2 ** (p.top_bits - p.bits)), c))

    # ------------------------------------------------------------------ float steps
    def float_conv(self, src, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        """torch.nn.functional.conv2d (zero padding given as ints)."""
        ints = (*_pair(stride, "stride"), *_pair(padding, "padding"),
                *_pair(dilation, "dilation"), groups)  # fmt: skip
        return self.step("conv", [src], (weight, bias), ints)

    def float_linear(self, src, weight, bias=None):
        return self.step("linear", [src], (weight, bias))

    def affine(self, src, mul, add):
        """y = x * mul + add per channel of dimension 1 (two fp32 roundings, as in torch)."""
        return self.step("affine", [src], (mul, add))

    def relu(self, src):
        return self.step("relu", [src])

    def clamp(self, src, lo: float, hi: float):
        return self.step("clamp", [src], floats=(lo, hi))

    def add(self, a, b, *, relu: bool = False):
        """a + b (broadcasting as torch), optionally followed by ReLU."""
        return self.step("add_relu" if relu else "add", [a, b])

    def max_pool2d(self, src, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None else _pair(stride, "stride")
        ints = (*k, *s, *_pair(padding, "padding"), *_pair(dilation, "dilation"), int(ceil_mode))
        return self.step("max_pool2d", [src], ints=ints)

    def avg_pool2d(self, src, kernel_size, stride=None, padding=0, ceil_mode=False,
                   count_include_pad=True):  # fmt: skip
        k = _pair(kernel_size, "kernel_size")
        s = k if stride is None else _pair(stride, "stride")
        ints = (*k, *s, *_pair(padding, "padding"), int(ceil_mode), int(count_include_pad))
        return self.step("avg_pool2d", [src], ints=ints)

    def adaptive_avg_pool2d(self, src, output_size):
        return self.step("adaptive_avg_pool2d", [src], ints=_pair(output_size, "output_size"))

    def flatten(self, src, start_dim: int = 0, end_dim: int = -1):
        return self.step("flatten", [src], ints=(start_dim, end_dim))

    def slice(self, src, dim: int, start: int = 0, end: int | None = None, step: int = 1):
        """x[..., start:end:step] along `dim` (a view, as torch's slicing)."""
        end = 2**62 if end is None else end
        return self.step("slice", [src], ints=(dim, start, end, step))

    def pad(self, src, pads, value: float = 0.0):
        """torch.nn.functional.pad with mode='constant'."""
        return self.step("pad", [src], ints=tuple(pads), floats=(value,))
