"""GPU benchmarks, each a ratio against baselines measured in the same run (needs a CUDA GPU).

fake_quant   fwd, bwd and fwd+bwd of LSQ+ fake quant (learnable scale and zero point),
             per-tensor and per-channel, fp32 and bf16, against the built-ins
             torch._fake_quantize_learnable_per_{tensor,channel}_affine and against the device's
             measured copy bandwidth (y.copy_(x) of the same tensor), counting the bytes that must
             move: forward reads x and writes y, backward reads x and dy and writes dx.
lowbit       lowbit_linear (cuda backend, int8 activations; and the Triton float-activation
             GEMM with fp16 activations and per-group scales, g = 128) at W2/W3/W4/W8, M = 1,
             16, 256, N = K = 8192, against the fp16 matmul and torch._int_mm (int8 x int8 ->
             int32).
supernet     one training step (forward, backward, SGD) of a ResNet-18-sized supernet
             (torchvision resnet18 converted, a random mixed config) against the float model.

TARGETS are records to check when a GPU run happens, not numbers tuned here: no machine of
this project has run these benchmarks. Times are CUDA-event medians with the L2 cache flushed
(a 256 MiB write) before every timed call.

    python -m bench.gpu_bench OUTDIR [fake_quant|lowbit|supernet ...]
(`make gpu-check` runs them; standalone, eqnet must be importable: installed or PYTHONPATH=python)
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

TARGETS = {
    "fake_quant": "fwd+bwd at >= 80 % of the copy bandwidth (bytes that must move) and "
    ">= 3x the built-in torch._fake_quantize_learnable_* op",
    "lowbit": "W4 GEMV (M = 1) with int8 activations >= 3x the fp16 matmul",
    "supernet": "recorded: supernet step time / float step time (no target set)",
}
_FLUSH: torch.Tensor | None = None


def time_cuda(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median seconds of fn() on the current CUDA stream, L2 flushed before each call."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _FLUSH.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def _safe(fn):
    """(seconds, "") or (nan, the error): a provider that cannot run is recorded, not fatal."""
    try:
        return time_cuda(fn), ""
    except Exception as exc:  # recorded in the table
        return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


# ---------------------------------------------------------------------------------------------
# Fake quant


def _ignore(rows: list[dict]) -> None:
    pass


def fake_quant_rows(emit=_ignore) -> list[dict]:
    """emit(rows) after each dtype and form: partial results survive a cut-short run."""
    import eqkernels as E

    rows = []
    shape = (128, 256, 28, 28)  # activation-shaped, 25.7 M elements
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(shape, device="cuda").to(dtype)
        dy = torch.randn_like(x)
        elem = x.element_size() * x.numel()
        buf = torch.empty_like(x)
        copy_s = time_cuda(lambda x=x, buf=buf: buf.copy_(x))
        copy_bw = 2 * elem / copy_s
        for form in ("per-tensor", "per-channel"):
            channels = 1 if form == "per-tensor" else shape[1]
            axis = None if form == "per-tensor" else 1
            scale = torch.full((channels,), 0.05, device="cuda", requires_grad=True)
            zp = torch.full((channels,), 3.0, device="cuda", requires_grad=True)
            xg = x.detach().requires_grad_()

            def ours(xg=xg, scale=scale, zp=zp, axis=axis):
                return E.fake_quant(xg, scale, zp, 0, 255, axis=axis, backend="triton")

            def builtin(xg=xg, scale=scale, zp=zp, form=form):
                if form == "per-tensor":
                    return torch._fake_quantize_learnable_per_tensor_affine(
                        xg, scale, zp, 0, 255, 1.0
                    )
                return torch._fake_quantize_learnable_per_channel_affine(
                    xg, scale, zp, 1, 0, 255, 1.0
                )

            for provider, op in (("eqkernels triton", ours), ("torch built-in", builtin)):
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    seconds, error = _time_mode(op, mode, xg, scale, zp, dy)
                    moved = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}[mode] * elem
                    rows.append(
                        {
                            "dtype": str(dtype).removeprefix("torch."),
                            "form": form,
                            "mode": mode,
                            "provider": provider,
                            "us": seconds * 1e6,
                            "GB/s": moved / seconds / 1e9,
                            "of_copy_bw": moved / seconds / copy_bw,
                            "copy_GB/s": copy_bw / 1e9,
                            "error": error,
                        }
                    )
            emit(_fake_quant_summary(rows))
    return _fake_quant_summary(rows)


def _fake_quant_summary(rows: list[dict]) -> list[dict]:
    _ratios(rows, ("dtype", "form", "mode"), "torch built-in", "x_vs_builtin")
    for row in rows:
        if row["provider"] == "eqkernels triton" and row["mode"] == "fwd+bwd":
            row["target_met"] = row["of_copy_bw"] >= 0.8 and row["x_vs_builtin"] >= 3.0
    return rows


def _time_mode(op, mode, xg, scale, zp, dy):
    if mode == "fwd":
        return _safe(lambda: op())
    if mode == "fwd+bwd":
        return _safe(lambda: torch.autograd.grad(op(), (xg, scale, zp), dy))
    try:
        y = op()
    except Exception as exc:
        return float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return _safe(lambda: torch.autograd.grad(y, (xg, scale, zp), dy, retain_graph=True))


def _ratios(rows, keys, baseline, column, time_key="us"):
    """column = baseline time / row time within each group (higher is faster)."""
    for row in rows:
        base = [
            r
            for r in rows
            if r["provider"] == baseline and all(r[k] == row[k] for k in keys) and r[time_key]
        ]
        value = base[0][time_key] / row[time_key] if base and row[time_key] else float("nan")
        row[column] = value


# ---------------------------------------------------------------------------------------------
# Low-bit GEMM


def lowbit_rows(emit=_ignore) -> list[dict]:
    import eqkernels as E

    rows = []
    N = K = 8192
    w16 = torch.randn(N, K, device="cuda", dtype=torch.float16)
    w8 = torch.randint(-128, 128, (K, N), device="cuda", dtype=torch.int8)
    for M in (1, 16, 256):
        x = torch.randn(M, K, device="cuda")
        x16, x8 = x.half(), torch.randint(-128, 128, (M, K), device="cuda", dtype=torch.int8)
        group = []
        for bits in (2, 3, 4, 8):
            q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, K), device="cuda")
            planes = E.pack_bitplanes(q.to(torch.int8), bits)
            scale = torch.rand(N, device="cuda") + 0.01
            act = dict(act_scale=torch.tensor([0.05], device="cuda"),
                       act_zero_point=torch.tensor([0.0], device="cuda"),
                       act_quant_min=-128, act_quant_max=127)  # fmt: skip
            seconds, error = _safe(
                lambda x=x, p=planes, s=scale, b=bits, a=act: E.lowbit_linear(
                    x, p, s, b, b, K=K, backend="cuda", **a
                )
            )
            group.append((f"eqkernels cuda W{bits}A8", seconds, error, bits / 8 * N * K))
            # The Triton float-activation GEMM: fp16 activations, per-group scales (g = 128).
            gscale = torch.rand(N, K // 128, device="cuda") + 0.01
            seconds, error = _safe(
                lambda x16=x16, p=planes, s=gscale, b=bits: E.lowbit_linear(
                    x16, p, s, b, b, K=K, backend="triton", group_size=128
                )
            )
            wbytes = bits / 8 * N * K + 4 * gscale.numel()
            group.append((f"eqkernels triton W{bits} fp16 g128", seconds, error, wbytes))
        seconds, error = _safe(lambda x16=x16: x16 @ w16.T)
        group.append(("fp16 matmul", seconds, error, 2 * N * K))
        seconds, error = _safe(lambda x8=x8: torch._int_mm(x8, w8))
        group.append(("torch._int_mm int8", seconds, error, N * K))
        for provider, seconds, error, weight_bytes in group:
            rows.append(
                {
                    "M": M,
                    "N": N,
                    "K": K,
                    "provider": provider,
                    "us": seconds * 1e6,
                    "weight_GB/s": weight_bytes / seconds / 1e9,
                    "error": error,
                }
            )
        emit(_lowbit_summary(rows))
    return _lowbit_summary(rows)


def _lowbit_summary(rows: list[dict]) -> list[dict]:
    _ratios(rows, ("M",), "fp16 matmul", "x_vs_fp16")
    _ratios(rows, ("M",), "torch._int_mm int8", "x_vs_int_mm")
    for row in rows:
        if row["provider"] == "eqkernels cuda W4A8" and row["M"] == 1:
            row["target_met"] = row["x_vs_fp16"] >= 3.0
    return rows


# ---------------------------------------------------------------------------------------------
# Supernet training step


def supernet_rows(emit=_ignore, batch: int = 64) -> list[dict]:
    import eqnet
    from eqnet import models
    from eqnet.space import ElasticSpace, SubnetConfig

    torch.manual_seed(0)
    rows = []
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")
    float_model = models.get("torchvision:resnet18", num_classes=1000).cuda().train()
    space = ElasticSpace(w_bits=(2, 3, 4, 8), a_bits=(2, 3, 4, 8), nested=True)
    supernet = eqnet.convert(models.get("torchvision:resnet18", num_classes=1000), space)
    supernet = supernet.cuda().train()
    eqnet.calibrate(supernet, [(x, y)], batches=1, method="lsq")
    supernet.set_config(SubnetConfig.random(space, supernet, torch.Generator().manual_seed(1)))
    for name, model in (("float resnet18", float_model), ("supernet resnet18 mixed", supernet)):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for amp in (False, True):

            def step(model=model, opt=opt, amp=amp):
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                opt.step()

            seconds, error = _safe(step)
            rows.append(
                {
                    "model": name,
                    "provider": name.split()[0],
                    "precision": "bf16 autocast" if amp else "fp32",
                    "batch": batch,
                    "ms": seconds * 1e3,
                    "images/s": batch / seconds,
                    "error": error,
                }
            )
            emit(_supernet_summary(rows))
    return _supernet_summary(rows)


def _supernet_summary(rows: list[dict]) -> list[dict]:
    _ratios(rows, ("precision",), "float", "x_vs_float", time_key="ms")
    return rows


STAGES = {"fake_quant": fake_quant_rows, "lowbit": lowbit_rows, "supernet": supernet_rows}


def write(name: str, rows: list[dict], out_dir: Path, note: str = "") -> tuple[Path, Path]:
    """rows -> OUT/<name>.csv and OUT/<name>.md (atomic writes)."""
    import csv
    import io
    import os

    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"# {name}", "", f"Target: {TARGETS.get(name, '-')}", ""] if name in TARGETS else []
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    paths = []
    for suffix, text in ((".csv", buf.getvalue()), (".md", "\n".join(lines) + "\n")):
        path = out_dir / f"{name}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    out = Path(argv[0])
    names = argv[1:] or list(STAGES)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        print(f"unknown benchmark {unknown}: accepted are {', '.join(STAGES)}")
        return 2
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA GPU (torch.cuda.is_available() is False); nothing run")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    note = f"Device: {device}, torch {torch.__version__}."
    for name in names:
        write(name, STAGES[name](lambda rows, n=name: write(n, rows, out, note)), out, note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
