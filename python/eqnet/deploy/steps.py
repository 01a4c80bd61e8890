"""The step-list runtime of a deployed network: the whole forward as one `eqkernels.StepProgram`
(one C++ call, no Python per layer).

`build_program(net)` traces the deployed float network with torch.fx, the integer layers
(`IntConv2d` / `IntLinear`) and torch.nn's modules as leaves, and turns each node into steps:
an integer layer becomes one fused quantized step (its prepared call's weights, activation
quantization and epilogue; a BN that could not be merged into its scale becomes an `affine`
step; when its value, after a fused ReLU / clamp, is read only by integer convs with one
activation quantizer and padding, the step stores their input codes instead of fp32), and the
float glue becomes the executor's float steps (ReLU / ReLU6 / Hardtanh,
residual adds with a following ReLU fused into one step, max / average / adaptive average
pooling, flatten, slicing with steps, constant padding, float conv / linear; Identity and
eval-mode Dropout are aliases). That covers the CIFAR ResNets, torchvision's ResNets and
MobileNetV2 and the digits CNN. Anything else (an op it does not know, an in-place op on a
value that is read again, a module in training mode, float activations, another backend)
raises NotImplementedError naming the node, and the deployed model keeps its per-layer module
path (loader.py records the reason).
"""

from __future__ import annotations

import functools
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

import eqkernels

from .runtime import IntConv2d, IntLinear

_RELU = (F.relu, torch.relu, torch.relu_)
_ADD = (operator.add, operator.iadd, torch.add)
_ALIAS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_FLOAT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d,
                  nn.AdaptiveAvgPool2d, nn.Flatten, nn.Conv2d, nn.Linear)  # fmt: skip


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, IntConv2d | IntLinear) or super().is_leaf_module(m, qualname)


def _refuse(node: fx.Node, why: str):
    raise NotImplementedError(f"step runtime: node {node.name!r} ({node.format_node()}): {why}")


class _Builder:
    def __init__(self, net: nn.Module, graph: fx.Graph):
        self.modules = dict(net.named_modules())
        self.graph = graph
        self.prog = eqkernels.StepProgram()
        self.buf: dict[fx.Node, int] = {}
        self.active: set[fx.Node] = set()

    def arg(self, node: fx.Node, a) -> int:
        if not isinstance(a, fx.Node) or a not in self.buf:
            _refuse(node, f"argument {a!r} is not a tensor computed by the network")
        return self.buf[a]

    def build(self) -> eqkernels.StepProgram:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotImplementedError(
                f"step runtime: the network takes {len(placeholders)} inputs (one is supported)"
            )
        self.buf[placeholders[0]] = self.prog.input
        for node in self.graph.nodes:
            if node.op == "placeholder" or node in self.buf:
                continue
            if node.op == "output":
                out = node.args[0]
                self.prog.finish(self.arg(node, out))
                return self.prog
            if node.op not in ("call_module", "call_function", "call_method"):
                _refuse(node, f"{node.op} nodes have no step")
            self.handle(node)
        raise NotImplementedError("step runtime: the traced graph has no output")

    def module(self, node: fx.Node, m: nn.Module) -> int:
        if node.kwargs or len(node.args) != 1:
            _refuse(node, "modules are called with one tensor")
        src = self.arg(node, node.args[0])
        if m.training:
            _refuse(node, "the module is in training mode")
        p = self.prog
        if isinstance(m, IntConv2d) and m.out_mul is None:
            return self.conv_with_epilogue(node, m, src)
        if isinstance(m, IntConv2d | IntLinear):
            out = (p.conv if isinstance(m, IntConv2d) else p.linear)(m.prepared(), src)
            return out if m.out_mul is None else p.affine(out, m.out_mul, m.out_add)
        if isinstance(m, _ALIAS_MODULES):
            return src
        if isinstance(m, nn.ReLU):
            return p.relu(src)
        if isinstance(m, nn.ReLU6 | nn.Hardtanh):
            return p.clamp(src, float(m.min_val), float(m.max_val))
        if isinstance(m, nn.MaxPool2d) and not m.return_indices:
            return p.max_pool2d(src, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
            return p.avg_pool2d(
                src, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad
            )
        if isinstance(m, nn.AdaptiveAvgPool2d) and _sizes(m.output_size):
            return p.adaptive_avg_pool2d(src, m.output_size)
        if isinstance(m, nn.Flatten):
            return p.flatten(src, m.start_dim, m.end_dim)
        if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and _sizes(m.padding):
            return p.float_conv(src, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
        if type(m) is nn.Linear:
            return p.float_linear(src, m.weight, m.bias)
        _refuse(node, f"module {type(m).__name__} has no step")

    def conv_with_epilogue(self, node: fx.Node, m: IntConv2d, src: int) -> int:
        """The conv, with a residual add and a ReLU or clamp (ReLU6, Hardtanh) that are its
        only consumers fused into its epilogue (the nodes in between that are aliases map to
        the same buffer)."""
        chain, user = self.sole_user_chain(node)
        residual, fused = None, []
        if user is not None and self.is_add(user):
            other = user.args[1] if user.args[0] is chain[-1] else user.args[0]
            in_place_other = user.target in (operator.iadd, "add_") and other is user.args[0]
            ready = other is not chain[-1] and self.ensure(other, depth=4)
            if ready and not in_place_other:
                residual, fused = self.buf[other], [user]
                chain, user = [*chain, user], self.sole_user_chain(user)[1]
        relu = user is not None and self.is_relu(user)
        clamp = None if user is None or relu else self.clamp_bounds(user)
        if relu or clamp is not None:
            fused.append(user)
        consumer = (
            None if residual is not None else self.code_consumer(fused[-1] if fused else node)
        )
        conv = functools.partial(self.prog.conv, m.prepared(), src, relu=relu, clamp=clamp)
        try:
            out = conv(residual=residual, codes_for=consumer)
        except ValueError:  # no codes: an output not finite by construction
            out = conv(residual=residual)
        for n in (*chain[1:], *fused):
            self.buf[n] = out
        return out

    def code_consumer(self, node: fx.Node):
        """The prepared conv whose activation codes `node`'s value can be stored as (the
        requantizing epilogue), or None: every reader of the value (through aliases) is an
        integer conv step that reads codes, all with the same activation quantizer and
        padding."""
        readers, todo = [], list(node.users)
        while todo:
            u = todo.pop()
            m = self.modules.get(u.target) if u.op == "call_module" else None
            if isinstance(m, _ALIAS_MODULES) and not m.training:
                todo.extend(u.users)
                continue
            if not isinstance(m, IntConv2d) or m.out_mul is not None or m.training:
                return None
            if u.kwargs or len(u.args) != 1:
                return None
            readers.append(m.prepared())
        if not readers or not all(self.prog.reads_codes(r) for r in readers):
            return None
        first = readers[0]
        key = _code_key(first)
        return first if all(_code_key(r) == key for r in readers[1:]) else None

    def ensure(self, node, depth: int) -> bool:
        """Whether `node` has a buffer, computing it now (ahead of graph order) when everything
        it reads has one within `depth` such nodes: the residual of a block is often traced
        after the conv whose epilogue adds it. Only pure nodes move (modules, functions and
        methods whose tensor arguments are all available); a node that cannot be computed yet
        is left to graph order."""
        if not isinstance(node, fx.Node):
            return False
        if node in self.buf:
            return True
        if (
            depth == 0
            or node in self.active
            or node.op not in ("call_module", "call_function", "call_method")
        ):
            return False
        inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        if not all(self.ensure(a, depth - 1) for a in inputs):
            return False
        self.handle(node)
        return node in self.buf

    def handle(self, node: fx.Node) -> None:
        self.active.add(node)  # a node being built is never computed ahead from inside itself
        if node.op == "call_module":
            self.buf[node] = self.module(node, self.modules[node.target])
        else:
            self.buf[node] = self.function(node)
        self.active.discard(node)

    def sole_user_chain(self, node: fx.Node) -> tuple[list[fx.Node], fx.Node | None]:
        """([node, alias nodes that follow it one by one], the next sole user or None)."""
        chain = [node]
        while len(chain[-1].users) == 1:
            (user,) = chain[-1].users
            is_alias = user.op == "call_module" and isinstance(
                self.modules[user.target], _ALIAS_MODULES
            )
            if not is_alias or self.modules[user.target].training:
                return chain, user
            chain.append(user)
        return chain, None

    def is_add(self, n: fx.Node) -> bool:
        fn = n.target
        method = n.op == "call_method" and fn in ("add", "add_")
        ok = (n.op == "call_function" and fn in _ADD) or method
        return (
            ok and len(n.args) == 2 and not n.kwargs and all(isinstance(a, fx.Node) for a in n.args)
        )

    def is_relu(self, n: fx.Node) -> bool:
        if len(n.args) != 1 or set(n.kwargs) - {"inplace"}:
            return False
        if n.op == "call_module":
            m = self.modules[n.target]
            return isinstance(m, nn.ReLU) and not m.training
        return (n.op == "call_function" and n.target in _RELU) or (
            n.op == "call_method" and n.target in ("relu", "relu_")
        )

    def clamp_bounds(self, n: fx.Node) -> tuple[float, float] | None:
        """(lo, hi) when n is an eval-mode ReLU6 / Hardtanh module or F.relu6 of one tensor."""
        if len(n.args) != 1 or set(n.kwargs) - {"inplace"}:
            return None
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, nn.ReLU6 | nn.Hardtanh) and not m.training:
                return float(m.min_val), float(m.max_val)
            return None
        return (0.0, 6.0) if n.op == "call_function" and n.target is F.relu6 else None

    def function(self, node: fx.Node) -> int:
        fn, args, kw = node.target, node.args, dict(node.kwargs)
        p = self.prog
        method = node.op == "call_method"
        if (fn in _RELU or (method and fn in ("relu", "relu_"))) and len(args) == 1:
            kw.pop("inplace", None)
            if fn in (torch.relu_, "relu_") or node.kwargs.get("inplace"):
                self.check_sole_reader(node)
            if not kw:
                return p.relu(self.arg(node, args[0]))
        if fn in (F.relu6,) and len(args) == 1 and set(kw) <= {"inplace"}:
            return p.clamp(self.arg(node, args[0]), 0.0, 6.0)
        if fn in _ADD or (method and fn in ("add", "add_")):
            if len(args) != 2 or kw:
                _refuse(node, "add takes two tensors and no alpha")
            if fn in (operator.iadd, "add_"):
                self.check_sole_reader(node)
            a, b = self.arg(node, args[0]), self.arg(node, args[1])
            relu = self.sole_relu_user(node)
            out = p.add(a, b, relu=relu is not None)
            if relu is not None:
                self.buf[relu] = out
            return out
        if fn is F.adaptive_avg_pool2d and len(args) == 2 and not kw and _sizes(args[1]):
            return p.adaptive_avg_pool2d(self.arg(node, args[0]), args[1])
        if (fn is torch.flatten or (method and fn == "flatten")) and not kw:
            dims = [a for a in args[1:] if isinstance(a, int)]
            if len(dims) == len(args) - 1 <= 2:
                return p.flatten(self.arg(node, args[0]), *dims)
        if fn is operator.getitem and len(args) == 2:
            return self.getitem(node, self.arg(node, args[0]), args[1])
        if fn is F.pad and len(args) >= 2 and kw.get("mode", "constant") == "constant":
            value = kw.get("value", args[3] if len(args) > 3 else None)
            value = 0.0 if value is None else value
            if len(args) <= 4 and _sizes(args[1]) is not None and isinstance(value, float | int):
                return p.pad(self.arg(node, args[0]), args[1], float(value))
        _refuse(node, "no step for this operation")

    def getitem(self, node: fx.Node, src: int, index) -> int:
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(s, slice) for s in index):
            _refuse(node, "indexing other than slices has no step")
        for dim, s in enumerate(index):
            parts = (s.start, s.stop, s.step)
            if not all(v is None or isinstance(v, int) for v in parts) or (s.step or 1) < 1:
                _refuse(node, f"slice {s!r}: int bounds and a positive step are supported")
            if parts != (None, None, None):
                src = self.prog.slice(src, dim, s.start or 0, s.stop, s.step or 1)
        return src

    def check_sole_reader(self, node: fx.Node) -> None:
        first = node.args[0]
        if isinstance(first, fx.Node) and len(first.users) != 1:
            _refuse(node, "an in-place op on a value that other nodes read")

    def sole_relu_user(self, node: fx.Node) -> fx.Node | None:
        if len(node.users) != 1:
            return None
        (user,) = node.users
        return user if self.is_relu(user) else None


def _code_key(prepared) -> tuple:
    """What fixes a conv's input codes: its activation quantizer and padding."""
    a = prepared.act
    z = None if a.zero_point is None else float(a.zero_point.reshape(()))
    scale = float(a.scale.reshape(()).to(torch.float32))
    return scale, z, a.quant_min, a.quant_max, tuple(prepared.geometry[3])


def _sizes(v) -> tuple | None:
    t = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, tuple | list) else None
    if t is None or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        return None
    return t


def build_program(net: nn.Module) -> eqkernels.StepProgram:
    """The deployed network `net` (integer layers configured) as one StepProgram; raises
    NotImplementedError naming the first node it cannot express."""
    try:
        graph = _Tracer().trace(net)
    except Exception as exc:  # fx raises many types for untraceable Python control flow
        raise NotImplementedError(
            f"step runtime: cannot trace {type(net).__name__} with torch.fx "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return _Builder(net, graph).build()
