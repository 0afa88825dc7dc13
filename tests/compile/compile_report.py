"""The sm_90 compile report: registers, spills, shared memory and wgmma use of every kernel, without a GPU.

Triton kernels are captured at the settings their launchers really use: the public ops are called (backend
"triton") on CPU tensors of the real shapes while Triton's driver is replaced by one that reports an sm_90 target
and kernel compilation is intercepted, so each launch records (kernel, signature, constexprs, num_warps,
num_stages, ...) instead of compiling and running.  Each recorded launch is then compiled for sm_90a; ``ptxas -v``
(the ptxas Triton uses, with Triton's flags) gives registers and spill stores, the compiled metadata the
(dynamic) shared memory, and the PTX whether Hopper's ``wgmma`` instructions are used.

CUDA kernels of the extension come from the ``ptxas -v`` log of its build (sm_90 entries) and the SASS of the
built module (``HGMMA`` = wgmma).

Run as a script (``python -m tests.compile.compile_report``, TRITON_INTERPRET unset) it prints the Triton rows as
one JSON line; ``tests/compile/test_compile_report.py`` adds the CUDA rows and writes
``build/compile_report_sm90.json`` with :func:`write_report`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import traceback

ARCH = 90
REPORT_NAME = f"compile_report_sm{ARCH}.json"

# Real shapes (DESIGN.md section 2): 1.3B heads, head_dim 128, bf16; chunk 3 latent frames of 1024 tokens, window
# 6 frames + 1 sink frame; training sequence 21 latent frames; 32 audio tokens per latent frame, 512 text tokens.
B, H, D = 1, 12, 128
TPF = 1024
CHUNK, WINDOW, SINK = 3 * TPF, 6 * TPF, TPF
TRAIN_LEN = 21 * TPF
TEXT, AUDIO = 512, 32


def _op_calls():
    """(op name, callable) pairs that run every Triton kernel of the ops through the public API."""
    import torch

    from lipforcing import RollingKVCache, ops

    bf16 = dict(dtype=torch.bfloat16)

    def x(*shape, grad=False):
        return torch.empty(*shape, **bf16).requires_grad_(grad)

    def block_causal():
        q, k, v = (x(B, TRAIN_LEN, H, D, grad=True) for _ in range(3))
        out = ops.block_causal_attention(q, k, v, chunk_size=CHUNK, window=WINDOW, sink=SINK, backend="triton")
        out.backward(torch.empty_like(out))

    def audio():
        F = 3
        q = x(B, F * TPF, H, D, grad=True)
        tk, tv = x(B, TEXT, H, D, grad=True), x(B, TEXT, H, D, grad=True)
        ak, av = x(B, F, AUDIO, H, D, grad=True), x(B, F, AUDIO, H, D, grad=True)
        out = ops.audio_cross_attention(q, tk, tv, ak, av, tokens_per_frame=TPF, audio_scale=1.0, backend="triton")
        out.backward(torch.empty_like(out))

    def chunk():
        rope = ops.rope_spec(D, (32, 32))
        for write, spec in ((True, rope), (True, None)):
            cache = RollingKVCache(B, H, D, chunk_size=CHUNK, window=WINDOW, sink=SINK, device="cpu", **bf16)
            with torch.no_grad():
                ops.chunk_attention(x(B, CHUNK, H, D), x(B, CHUNK, H, D), x(B, CHUNK, H, D), cache, write=write,
                                    rope=spec, backend="triton")
        cache = RollingKVCache(B, H, D, chunk_size=CHUNK, window=WINDOW, sink=SINK, device="cpu", **bf16)
        q, k, v = (x(B, CHUNK, H, D, grad=True) for _ in range(3))
        out = ops.chunk_attention(q, k, v, cache, write=False, rope=rope, backend="triton")
        out.backward(torch.empty_like(out))
        # the split-KV forward + combine, with the split count the launcher picks for 132 SMs (H100/H200)
        from lipforcing.kernels.chunk_attention import chunk_attention_triton

        with torch.no_grad():
            for write in (True, False):
                cache = RollingKVCache(B, H, D, chunk_size=CHUNK, window=WINDOW, sink=SINK, device="cpu", **bf16)
                chunk_attention_triton(q, k, v, cache.k, cache.v, cache.pos, CHUNK, WINDOW, SINK, write, D ** -0.5,
                                       rope.cos, rope.sin, *rope.grid, num_sms=132)

    def denoise():
        xt, flow = x(B, 16, 3, 64, 64), x(B, 16, 3, 64, 64)
        ops.denoise_update(xt, flow, 0.999, 0.769, seed=1, backend="triton")
        ops.denoise_update(xt, flow, 0.999, 0.769, noise=x(B, 16, 3, 64, 64), backend="triton")

    def qk_norm():
        # norm only (the dynamic-RoPE chunk step), + absolute RoPE of q and k (the absolute one), + window-relative
        # RoPE of q and the cache write of k and v (not used by the model yet)
        q, k, v = (x(B, CHUNK, H, D) for _ in range(3))
        w = x(H * D)
        rope = ops.rope_spec(D, (32, 32))
        ops.qk_norm(q, k, w, w, eps=1e-6, backend="triton")
        ops.qk_norm(q, k, w, w, eps=1e-6, rope=rope, frame_offset=3, backend="triton")
        cache = RollingKVCache(B, H, D, chunk_size=CHUNK, window=WINDOW, sink=SINK, device="cpu", **bf16)
        ops.qk_norm(q, k, w, w, eps=1e-6, rope=rope, rope_positions="window", cache=cache, v=v, backend="triton")

    return [("block_causal_attention", block_causal), ("audio_cross_attention", audio),
            ("chunk_attention", chunk), ("denoise_update", denoise), ("qk_norm", qk_norm)]


def _capture_launches(ops=None):
    """Run every op with launches intercepted; returns (captures, errors).  A capture is (op, jit function,
    signature, constexprs, options, attrs), one per distinct compilation the launchers asked for."""
    import torch
    import triton.backends.nvidia.compiler  # noqa: F401  (the nvidia backend must be importable)
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    from lipforcing.ops import _dispatch

    torch.set_num_threads(1)

    class _Sm90Driver:
        """Enough of a Triton driver for the launch path up to compilation: an sm_90 target, device 0."""

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

    captures, seen, current = [], set(), [None]

    def record(self, key, signature, device, constexprs, options, attrs, warmup):
        ident = (self.__name__, repr(key))
        if ident not in seen:
            seen.add(ident)
            captures.append((current[0], self, signature, constexprs, options, attrs))
        return None  # not compiled here and not launched

    driver.set_active(_Sm90Driver())
    JITFunction._do_compile = record
    # CPU tensors stand in for CUDA ones: every op goes to its Triton launcher (no CPU/interpreter checks)
    _dispatch.resolve = lambda op, impls, backend, device, args, kwargs: "triton"
    errors = []
    for op, call in _op_calls():
        if ops and op not in ops:
            continue
        current[0] = op
        try:
            call()
        except Exception:  # reported as a row; the test fails on it
            errors.append({"kernel": op, "error": traceback.format_exc(limit=4)[-1500:]})
    return captures, errors


def _ptxas_v(ptx: str, fp_fusion: bool) -> tuple[int, int]:
    """(registers, spill-store bytes) from ``ptxas -v`` with Triton's own ptxas and flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(ARCH).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{ARCH}a", src,
               "-o", os.path.join(tmp, "k.o")]
        if not fp_fusion:
            cmd.insert(1, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores", log)
    return regs, int(spill.group(1)) if spill else 0


def _config_label(constexprs: dict, options) -> str:
    flags = [f"{v}" if isinstance(v, str) else f"{k}={v}" for k, v in sorted(constexprs.items(), key=str)]
    return f"warps={options.num_warps},stages={options.num_stages}," + ",".join(flags)


def triton_rows(ops: tuple[str, ...] | None = None) -> list[dict]:
    """One row per captured Triton compilation, compiled for sm_90a (only ``ops`` when given)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    captures, rows = _capture_launches(ops)
    for op, fn, signature, constexprs, options, attrs in captures:
        names = fn.arg_names
        named = {names[path[0]]: val for path, val in constexprs.items() if len(path) == 1}
        row = {"kernel": f"{op}.{fn.__name__}", "op": op, "config": _config_label(named, options)}
        try:
            c = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", ARCH, 32),
                               options=options.__dict__)
            regs, spill = _ptxas_v(c.asm["ptx"], options.enable_fp_fusion)
            row.update(regs=regs, spill_bytes=spill, smem_bytes=int(c.metadata.shared),
                       wgmma="wgmma.mma_async" in c.asm["ptx"])
        except Exception:
            row["error"] = traceback.format_exc(limit=4)[-1500:]
        rows.append(row)
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def cuobjdump() -> str | None:
    """Path of cuobjdump (Triton's copy, else PATH), or None."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        tool = os.path.join(os.path.dirname(get_ptxas(ARCH).path), "cuobjdump")
    except Exception:
        tool = None
    return tool if tool and os.path.exists(tool) else shutil.which("cuobjdump")


def sass_by_function(so_path: str) -> dict[str, str] | None:
    """SASS text of every sm_90 / sm_90a function of the module, by mangled name; None without cuobjdump."""
    tool = cuobjdump()
    if tool is None:
        return None
    sass = subprocess.run([tool, "-sass", "-arch", f"sm_{ARCH}", so_path], capture_output=True, text=True).stdout
    funcs: dict[str, list[str]] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            funcs.setdefault(current, [])
        elif current:
            funcs[current].append(line)
    return {name: "\n".join(lines) for name, lines in funcs.items()}


def _hgmma_functions(so_path: str) -> set[str] | None:
    """Mangled names of the sm_90 functions whose SASS has HGMMA (wgmma) instructions; None without cuobjdump."""
    sass = sass_by_function(so_path)
    return None if sass is None else {name for name, text in sass.items() if "HGMMA" in text}


def cuda_path(kernel: str, wgmma: bool | None) -> str:
    """Which GPUs run a CUDA kernel of the extension (the report's "path" label)."""
    if "_sm90_kernel" in kernel:
        return "sm_90 (wgmma + TMA, built for sm_90a)"
    if "chunk_attention_fwd_kernel" in kernel:
        return ("sm_80-89 (mma.sync); on sm_90 only for a short last chunk or LIPFORCING_CUDA_SM90=0 (full chunks "
                "run chunk_attention_sm90_kernel)")
    if "audio_cross_attention_fwd_kernel" in kernel:
        return ("sm_80-89 (mma.sync); on sm_90 only for head_dim 32/96, strides TMA cannot load or "
                "LIPFORCING_CUDA_SM90=0 (the rest run audio_cross_attention_sm90_kernel)")
    if "attention" in kernel and "_fwd_kernel" in kernel and not wgmma:
        return "sm_80+ (mma.sync; auto prefers triton on sm_90)"
    return "sm_80+"


def _mma_sync_dynamic_smem(name: str) -> int:
    """Dynamic shared memory the mma.sync kernels are launched with (``ptxas -v`` shows only the static part).
    Mirrors csrc/chunk_attention.cu ``fwd_smem_bytes`` (2 stages x (K, V) x 64 rows x (D + 8) x 2 bytes) and the
    audio_cross_attention.cu launcher ((64 + 4 x 32) rows x (D + 8) x 2 bytes); change them together."""
    m = re.search(r"(?<!_sm90)chunk_attention_fwd_kernel<[^,]+, (\d+)", name)
    if m:
        return 2 * 2 * 64 * (int(m.group(1)) + 8) * 2
    m = re.search(r"audio_cross_attention_fwd_kernel<[^,]+, (\d+)>", name)
    if m:
        return (64 + 4 * 32) * (int(m.group(1)) + 8) * 2
    return 0


def cuda_rows(ptxas_log: str, so_path: str, module=None) -> list[dict]:
    """Rows for the CUDA extension's sm_90 kernels from its build's ``ptxas -v`` log.  ``smem_bytes`` is the static
    shared memory, plus, for the sm_90 kernels (chunk_attention, audio_cross_attention), the dynamic shared memory
    they are launched with (``module.<op>_sm90_smem_bytes``, when the built module is given)."""
    entries: dict[str, dict] = {}
    current = None
    for line in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)a?'", line)
        if m:
            current = m.group(1) if int(m.group(2)) == ARCH else None
            if current:
                entries[current] = {"regs": 0, "spill_bytes": 0, "smem_bytes": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m:
            entries[current]["spill_bytes"] = int(m.group(1))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            entries[current]["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            entries[current]["smem_bytes"] = int(smem.group(1)) if smem else 0
    hgmma = _hgmma_functions(so_path)
    names = _demangle(list(entries))
    rows = []
    for mangled, r in entries.items():
        name = names[mangled]
        wgmma = (mangled in hgmma) if hgmma is not None else None
        row = {"kernel": "cuda." + name, **r, "wgmma": wgmma, "path": cuda_path(name, wgmma)}
        m = re.search(r"(chunk_attention|audio_cross_attention)_sm90_kernel<[^,]+, (\d+)>", name)
        if m and module is not None and hasattr(module, f"{m.group(1)}_sm90_smem_bytes"):
            row["smem_bytes"] += getattr(module, f"{m.group(1)}_sm90_smem_bytes")(int(m.group(2)))
        row["smem_bytes"] += _mma_sync_dynamic_smem(name)
        rows.append(row)
    return rows


def write_report(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    import sys

    print(json.dumps(triton_rows(tuple(sys.argv[1:]) or None)))
