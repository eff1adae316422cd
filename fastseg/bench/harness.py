"""The benchmark harness shared by every op suite.

An op suite (one module per op, e.g. fastseg/bench/cross_entropy.py) subclasses `Suite` and
says four things: which problems to run (shapes x dtypes, per device), which providers
compute the op (fastseg backends, eager PyTorch, torch.compile), how to make one set of
inputs, and how many bytes each mode must move at least. The harness does the rest, the same
way for every op:

* modes: "forward" (the training forward: grad-enabled, so it saves what backward needs),
  "backward" (autograd.grad of the output, the forward run untimed before each repeat), and
  "full" (forward + backward in one timed step);
* time: median over repeats after a warm-up, with the inputs rotated across several
  pre-allocated copies (enough that together they exceed the last-level cache) so caches do
  not flatter; CUDA events around each repeat on a GPU, `time.perf_counter` on the CPU;
* peak memory of one step above what was allocated before it: on CUDA
  `torch.cuda.max_memory_allocated()` minus `memory_allocated()`; on the CPU the running sum
  of the allocation and free events that `torch.profiler(profile_memory=True)` records for
  torch's CPU allocator during the step (peak RSS would be process-wide, monotone and blind
  to freed pages, so it cannot attribute a peak to one step). "retained" is what is still
  held when the step returns (for "forward": the output plus the tensors saved for backward);
* bandwidth: the suite's minimal bytes / median time, and (where the device-to-device copy
  bandwidth was measured) the floor, minimal bytes / copy bandwidth, as a fraction of the time;
* a check: every provider's output and gradients are compared with the baseline's (eager) on
  one copy of the inputs - a sanity flag against fast-but-wrong, not the numerics tests;
* output: one JSON file (a header with device, versions, commit, date, command; one record
  per (op, problem, dtype, mode, provider)), a markdown report (also printed) and one PNG
  chart per op (matplotlib, Agg; skipped with a note when matplotlib is missing). The JSON is
  rewritten after every problem, so a run cut short still leaves its results; `--from-json`
  renders the markdown and charts again from a JSON file (e.g. one fetched from a GPU run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

SCHEMA = "fastseg.bench/1"
MODES = ("forward", "backward", "full")
MODE_TITLES = {
    "forward": "forward",
    "backward": "backward",
    "full": "full step (forward + backward)",
}
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

DTYPE_SHORT = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
}
DTYPE_TOLERANCE = {  # relative error (vs max |baseline|) above which a check is flagged
    torch.float64: 1e-6,
    torch.float32: 1e-3,
    torch.float16: 5e-2,
    torch.bfloat16: 5e-2,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
               "half": "float16", "float": "float32", "double": "float64"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# What a suite declares
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Problem:
    """One input configuration: a named shape at one dtype, plus op options to record."""

    name: str                      # e.g. "cityscapes"
    shape: tuple[int, ...]         # the main input's shape, e.g. (N, C, H, W)
    dtype: torch.dtype
    params: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def shape_str(self) -> str:
        return "x".join(str(s) for s in self.shape)

    @property
    def label(self) -> str:
        return f"{self.name} {self.shape_str} {DTYPE_SHORT.get(self.dtype, dtype_name(self.dtype))}"


@dataclasses.dataclass
class Inputs:
    """One copy of a problem's inputs. `grad_tensors` are the leaves that get gradients."""

    args: tuple
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    grad_tensors: tuple[torch.Tensor, ...] = ()

    @property
    def nbytes(self) -> int:
        tensors = [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclasses.dataclass
class Provider:
    """Something that computes the op. `make(problem)` returns fn(*args, **kwargs) -> output.

    kind: "eager" (the baseline PyTorch composition), "compile" (torch.compile of it),
    "fused" (a fastseg backend) or "reference" (fastseg's pure-PyTorch reference).
    default=False: only run when asked for by name (--providers).
    inputs: optional inputs(copy) -> Inputs, this provider's own inputs made (untimed, once
    per copy) from each copy of the problem's, e.g. a part of the op timed on an input that
    the op itself would compute (a pre-concatenated tensor); None: the problem's inputs.
    check=False: the provider computes something else than the op (a part of it), so it is
    not compared with the baseline.
    """

    name: str
    kind: str
    make: Callable[[Problem], Callable[..., Any]]
    note: str = ""
    default: bool = True
    inputs: Callable[[Inputs], Inputs] | None = None
    check: bool = True


class Suite:
    """Base class of an op's benchmark suite (see fastseg/bench/cross_entropy.py)."""

    op: str = ""
    title: str = ""
    modes: tuple[str, ...] = MODES
    baseline: str = "eager"
    bytes_model: str = ""          # how min_bytes counts, shown in the report

    def problems(self, device: torch.device, quick: bool) -> list[Problem]:
        raise NotImplementedError

    def providers(self, device: torch.device) -> list[Provider]:
        raise NotImplementedError

    def unavailable(self, device: torch.device) -> dict[str, str]:
        """Providers that cannot run on this device, with the reason (for the header)."""
        return {}

    def make_inputs(self, problem: Problem, device: torch.device,
                    generator: torch.Generator) -> Inputs:
        raise NotImplementedError

    def min_bytes(self, problem: Problem, mode: str) -> int:
        raise NotImplementedError

    def tolerance(self, problem: Problem) -> float:
        return DTYPE_TOLERANCE.get(problem.dtype, 5e-2)

    def flops(self, problem: Problem, mode: str) -> int | None:
        """Floating-point operations of one step of `mode` (None: not counted; a suite that
        counts them gets a TFLOP/s column)."""
        return None

    def summary(self, records: list[dict], header: dict) -> list[str]:
        """Extra markdown lines for the report (e.g. targets), from the records; stored in
        the JSON with the suite's info, so --from-json renders them again."""
        return []


# --------------------------------------------------------------------------------------------
# Providers every suite can reuse
# --------------------------------------------------------------------------------------------


def eager_provider(fn: Callable, name: str = "eager", note: str = "") -> Provider:
    return Provider(name=name, kind="eager", make=lambda problem: fn, note=note)


def params_eager_provider(factory: Callable[[dict], Callable], name: str = "eager",
                          note: str = "") -> Provider:
    """The eager composition built per problem: factory(problem.params) -> fn."""
    return Provider(name=name, kind="eager", make=lambda problem: factory(problem.params),
                    note=note)


def params_compile_provider(factory: Callable[[dict], Callable], name: str = "compile",
                            note: str = "", default: bool = True,
                            **compile_kwargs) -> Provider:
    """torch.compile(factory(problem.params)), compiled afresh per problem (static shapes: the
    best case for Inductor). The compile happens in the harness' untimed setup step and its
    time is recorded as the record's setup_s; a compile failure is recorded and the run goes
    on."""

    def make(problem: Problem) -> Callable:
        # One problem at a time: forget earlier shapes so the recompile limit never trips.
        torch._dynamo.reset()
        return torch.compile(factory(problem.params), **compile_kwargs)

    options = ", ".join(f"{k}={v!r}" for k, v in compile_kwargs.items())
    return Provider(name=name, kind="compile", make=make, default=default,
                    note=note or f"torch.compile({options or 'default options'})")


def compile_provider(fn: Callable, name: str = "compile", note: str = "",
                     **compile_kwargs) -> Provider:
    """torch.compile(fn), compiled afresh per problem (see params_compile_provider)."""
    return params_compile_provider(lambda params: fn, name=name, note=note, **compile_kwargs)


def reference_provider(make: Callable[[Problem], Callable], note: str,
                       default: bool = True) -> Provider:
    """fastseg's pure-PyTorch reference (usually default only when no fused backend is live)."""
    return Provider(name="reference", kind="reference", make=make, note=note, default=default)


@dataclasses.dataclass(frozen=True)
class DeviceTables:
    """A suite's problem tables: named entries (name first), quick names and dtypes, per
    device kind (CUDA vs the rest)."""

    gpu: Sequence
    cpu: Sequence
    quick_gpu: Sequence[str]
    quick_cpu: Sequence[str]
    gpu_dtypes: Sequence[torch.dtype]
    cpu_dtypes: Sequence[torch.dtype]

    @classmethod
    def of(cls, gpu, cpu, quick_gpu, quick_cpu, gpu_dtypes, cpu_dtypes) -> DeviceTables:
        return cls(list(gpu), list(cpu), tuple(quick_gpu), tuple(quick_cpu),
                   tuple(gpu_dtypes), tuple(cpu_dtypes))

    def select(self, device: torch.device, quick: bool) -> tuple[list, tuple[torch.dtype, ...]]:
        """(the entries to run on this device, in table order; the dtypes to run them in)."""
        cuda = device.type == "cuda"
        entries = self.gpu if cuda else self.cpu
        quick_names = self.quick_gpu if cuda else self.quick_cpu
        dtypes = self.gpu_dtypes if cuda else self.cpu_dtypes
        return [e for e in entries if not quick or e[0] in quick_names], tuple(dtypes)


class TabledSuite(Suite):
    """A Suite whose problems come from DeviceTables and whose backend discovery is cached per
    device. Subclasses define _discover(device) with self.discovered(device, compute)."""

    def __init__(self, tables: DeviceTables):
        self.tables = tables
        self._discovered: dict[str, Any] = {}

    def discovered(self, device: torch.device, compute: Callable[[], Any]) -> Any:
        key = str(device)
        if key not in self._discovered:
            self._discovered[key] = compute()
        return self._discovered[key]

    def _discover(self, device: torch.device) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def unavailable(self, device: torch.device) -> dict[str, str]:
        return dict(self._discover(device)[1])


FUSED_BACKENDS = ("cuda", "triton", "cpu")  # when fastseg.BACKENDS is not there


def fused_backend_names() -> list[str]:
    """fastseg's fused backends ("reference" is its own provider; "auto" is one of these)."""
    try:
        import fastseg

        names = list(getattr(fastseg, "BACKENDS", FUSED_BACKENDS))
    except Exception:  # noqa: BLE001
        names = list(FUSED_BACKENDS)
    return [n for n in names if n not in ("reference", "auto")]


def discover_backends(
    probe: Callable[[str], Any],
    backends: Sequence[str],
) -> tuple[list[str], dict[str, str]]:
    """Which fastseg backends can serve the probe on this device.

    probe(backend) runs a tiny call with an explicit backend; NotImplementedError means the
    backend cannot serve it (not live), any other exception is recorded as broken.
    Returns (live backend names, {backend: reason} for the others).
    """
    live, unavailable = [], {}
    for name in backends:
        try:
            probe(name)
        except NotImplementedError as e:
            unavailable[name] = _reason_for(name, e)
        except Exception as e:  # noqa: BLE001 - a broken backend must not stop the run
            unavailable[name] = f"error: {type(e).__name__}: {_one_line(e)}"
        else:
            live.append(name)
    return live, unavailable


def discover_fused(probe: Callable[[str], Any], missing: str | None = None,
                   backends: Sequence[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """discover_backends, the unavailable ones named as providers ("fastseg-<backend>").
    missing: why the fastseg op itself is not there (then nothing is probed)."""
    if missing is not None:
        return [], {"fastseg": missing}
    live, unavailable = discover_backends(
        probe, fused_backend_names() if backends is None else backends)
    return live, {f"fastseg-{name}": reason for name, reason in unavailable.items()}


def _reason_for(name: str, e: BaseException) -> str:
    """The line of a multi-backend NotImplementedError that is about `name`, if any."""
    for line in str(e).splitlines():
        if line.strip().startswith(f"{name}:"):
            return _one_line(line.strip()[len(name) + 1:])
    return _one_line(e)


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunConfig:
    device: torch.device
    quick: bool = False
    warmup_ms: float = 100.0       # warm up at least this long (and at least 2 calls)
    rep_ms: float = 1000.0         # aim the timed repeats at this much time in all
    min_reps: int = 5
    max_reps: int = 100
    max_copies: int = 16
    providers: Sequence[str] | None = None   # None: the suite's default providers
    modes: Sequence[str] | None = None
    problems: Sequence[str] | None = None
    dtypes: Sequence[torch.dtype] | None = None
    measure_memory: bool = True
    check: bool = True
    max_time_s: float | None = None          # stop starting new runs after this long
    copy_bytes: int | None = None            # size of the copy-bandwidth probe (None: auto)

    @classmethod
    def for_device(cls, device: torch.device, quick: bool, **overrides) -> RunConfig:
        if device.type == "cuda":
            base = dict(warmup_ms=25.0, rep_ms=60.0 if quick else 150.0,
                        min_reps=5 if quick else 10, max_reps=100 if quick else 300)
        else:
            base = dict(warmup_ms=50.0 if quick else 150.0, rep_ms=600.0 if quick else 2000.0,
                        min_reps=5 if quick else 9, max_reps=30 if quick else 100)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(device=device, quick=quick, **base)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(device: torch.device) -> int:
    """The last-level cache the rotation must defeat."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        return max(size, 32 * 2**20)
    except (OSError, ValueError):
        return 64 * 2**20


def _copies_for(nbytes: int, device: torch.device, max_copies: int) -> int:
    """Enough input copies to exceed 4x the last-level cache, at least 2, within a budget."""
    copies = max(2, min(max_copies, math.ceil(4 * _cache_bytes(device) / max(nbytes, 1))))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = 2 * 2**30
    while copies > 1 and copies * nbytes > budget:
        copies -= 1
    return copies


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class StepTimer:
    """Times step(i, prepare(i)) for one provider; only `step` is timed.

    warmup(): runs until cfg.warmup_ms has passed (at least 2 calls); its median sets the
    number of timed repeats (rep_ms / estimate, clamped to [min_reps, max_reps]).
    rep(): one timed repeat; the copy index rotates over n_copies. On CUDA an event pair
    around each repeat and one sync in result(); on the CPU time.perf_counter.
    Several timers can interleave their repeats (see time_interleaved).
    """

    def __init__(self, prepare: Callable[[int], Any], step: Callable[[int, Any], Any],
                 n_copies: int, cfg: RunConfig):
        self.prepare, self.step, self.n_copies, self.cfg = prepare, step, n_copies, cfg
        self.cuda = cfg.device.type == "cuda"
        self.i = 0
        self.reps = 0
        self.times: list[float] = []
        self.events: list[tuple[Any, Any]] = []

    def warmup(self) -> None:
        cfg, device = self.cfg, self.cfg.device
        estimates: list[float] = []
        start = time.perf_counter()
        while len(estimates) < 2 or (
            (time.perf_counter() - start) * 1e3 < cfg.warmup_ms and len(estimates) < cfg.max_reps
        ):
            state = self.prepare(self.i % self.n_copies)
            _sync(device)
            t0 = time.perf_counter()
            held = [self.step(self.i % self.n_copies, state)]  # freed after the clock stops
            _sync(device)
            estimates.append(time.perf_counter() - t0)
            held.clear()
            del state
            self.i += 1
        estimate_ms = statistics.median(estimates) * 1e3
        self.reps = int(min(cfg.max_reps, max(cfg.min_reps, cfg.rep_ms / max(estimate_ms, 1e-3))))

    def rep(self) -> None:
        k = self.i % self.n_copies
        self.i += 1
        state = self.prepare(k)
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = self.step(k, state)
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            result = self.step(k, state)
            self.times.append(time.perf_counter() - t0)
        del result, state

    @property
    def done(self) -> int:
        return len(self.events) + len(self.times)

    def result(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize(self.cfg.device)
            self.times += [s.elapsed_time(e) / 1e3 for s, e in self.events]
            self.events = []
        times = sorted(self.times)
        return {
            "time_ms": statistics.median(times) * 1e3,
            "time_ms_p20": _percentile(times, 0.2) * 1e3,
            "time_ms_p80": _percentile(times, 0.8) * 1e3,
            "time_ms_min": times[0] * 1e3,
            "reps": len(times),
        }


def time_step(prepare: Callable[[int], Any], step: Callable[[int, Any], Any], n_copies: int,
              cfg: RunConfig) -> dict[str, float]:
    """Median time of step(i, prepare(i)) over repeats (see StepTimer)."""
    timer = StepTimer(prepare, step, n_copies, cfg)
    timer.warmup()
    for _ in range(timer.reps):
        timer.rep()
    return timer.result()


def time_interleaved(timers: dict[str, StepTimer],
                     on_error: Callable[[str, BaseException], None]) -> dict[str, dict]:
    """Warm every timer up, then run their repeats round-robin (the order rotating each round),
    so that a drift in the machine's load hits every provider alike: on a shared CPU the
    ratios between providers then hold even when the absolute times wander."""
    live: dict[str, StepTimer] = {}
    for name, timer in timers.items():
        try:
            timer.warmup()
        except Exception as e:  # noqa: BLE001
            on_error(name, e)
        else:
            live[name] = timer
    names = list(live)
    rounds = max((t.reps for t in live.values()), default=0)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)] if names else []
        for name in order:
            timer = live.get(name)
            if timer is None or timer.done >= timer.reps:
                continue
            try:
                timer.rep()
            except Exception as e:  # noqa: BLE001
                on_error(name, e)
                del live[name]
    results = {}
    for name, timer in live.items():
        try:
            results[name] = timer.result()
        except Exception as e:  # noqa: BLE001
            on_error(name, e)
    return results


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the C++ profiler's start/stop chatter on fd 2 (Python's stderr stays)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _cpu_memory_of(run: Callable[[], Any]) -> tuple[Any, int | None, int | None]:
    """(result, peak bytes, retained bytes) of run() from the profiler's CPU allocation events."""
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:
        return result, None, None
    memory = []
    for e in events:
        if e.name() != "[memory]":
            continue
        device_type = getattr(e, "device_type", None)
        if device_type is not None and "CPU" not in str(device_type()):
            continue
        memory.append((e.start_ns(), e.nbytes()))
    memory.sort(key=lambda item: item[0])
    running = peak = 0
    for _, nbytes in memory:
        running += nbytes
        peak = max(peak, running)
    return result, peak, running


def measure_memory(prepare: Callable[[int], Any], step: Callable[[int, Any], Any],
                   device: torch.device) -> dict[str, Any]:
    """Peak and retained bytes of one step (copy 0) above what was allocated before it."""
    state = prepare(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = step(0, state)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        retained = torch.cuda.memory_allocated(device) - base
        method = "torch.cuda.max_memory_allocated - memory_allocated before the step"
    else:
        result, peak, retained = _cpu_memory_of(lambda: step(0, state))
        method = "torch.profiler(profile_memory=True): running sum of CPU allocation events"
    del result
    state = None  # free it before the next measurement
    return {"peak_bytes": peak, "retained_bytes": retained, "memory_method": method}


def copy_bandwidth(device: torch.device, nbytes: int | None = None,
                   cfg: RunConfig | None = None) -> dict[str, float]:
    """Device-to-device copy bandwidth, counting bytes read + bytes written."""
    if nbytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = int(min(2**30, free // 8))
        else:
            nbytes = 256 * 2**20
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    cfg = cfg or RunConfig.for_device(device, quick=True)
    timing = time_step(lambda i: None, lambda i, s: dst.copy_(src), 1,
                       dataclasses.replace(cfg, min_reps=max(cfg.min_reps, 10)))
    src = dst = None
    seconds = timing["time_ms"] / 1e3
    return {"copy_bandwidth_GBps": 2 * nbytes / seconds / 1e9, "copy_bytes": nbytes,
            "copy_time_ms": timing["time_ms"]}


# --------------------------------------------------------------------------------------------
# Running a suite
# --------------------------------------------------------------------------------------------


class Progress:
    """A tqdm bar when tqdm is installed and stderr is a terminal, else one printed line per
    finished run (on stderr)."""

    def __init__(self, total: int, desc: str):
        self.total, self.done, self.desc = total, 0, desc
        self.bar = None
        # A bar redrawn with carriage returns is noise in a log file: plain lines there
        # (FASTSEG_BENCH_PROGRESS=bar|lines overrides).
        style = os.environ.get("FASTSEG_BENCH_PROGRESS") or (
            "bar" if sys.stderr.isatty() else "lines")
        try:
            if style != "bar":
                raise ImportError
            from tqdm import tqdm
        except ImportError:
            print(f"{desc}: {total} runs", file=sys.stderr, flush=True)
        else:
            self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True,
                            file=sys.stderr)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=True)

    def finish(self, label: str, outcome: str) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        else:
            width = len(str(self.total))
            print(f"[{self.done:{width}d}/{self.total}] {label}: {outcome}", file=sys.stderr,
                  flush=True)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _grad_output(out: torch.Tensor, seed: int) -> torch.Tensor:
    if out.dim() == 0:
        return torch.ones_like(out)
    g = torch.Generator(device=out.device).manual_seed(seed)
    return torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=g)


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _diff(a, b) -> tuple[float, float]:
    """(max |a - b|, max |b|) over matching tensors, in float32."""
    diff = scale = 0.0
    for x, y in zip(_as_tuple(a), _as_tuple(b)):
        if x is None or y is None:
            continue
        x, y = x.detach().float(), y.detach().float()
        if x.shape != y.shape:
            return math.inf, 0.0
        if x.numel():
            diff = max(diff, (x - y).abs().max().item())
            scale = max(scale, y.abs().max().item())
    return diff, scale


def _check(outputs, grads, baseline, tol: float) -> dict[str, Any]:
    out_diff, out_scale = _diff(outputs, baseline[0])
    grad_diff, grad_scale = _diff(grads, baseline[1])
    rel = max(out_diff / max(out_scale, 1e-30), grad_diff / max(grad_scale, 1e-30))
    finite = all(torch.isfinite(t).all().item() for t in (*_as_tuple(outputs), *grads)
                 if t is not None)
    return {"out_max_abs_diff": out_diff, "grad_max_abs_diff": grad_diff,
            "grad_scale": grad_scale, "rel_err": rel, "tolerance": tol,
            "ok": bool(finite and rel <= tol)}


def _status_of(e: BaseException) -> str:
    return "unsupported" if isinstance(e, NotImplementedError) else "error"


def run_suite(suite: Suite, cfg: RunConfig, providers: list[Provider] | None = None,
              progress_desc: str | None = None,
              on_problem_done: Callable[[list[dict]], None] | None = None,
              started: float | None = None) -> list[dict]:
    """Run every (problem, provider, mode) of a suite; returns the records."""
    device = cfg.device
    started = time.perf_counter() if started is None else started
    providers = list(suite.providers(device) if providers is None else providers)
    if cfg.providers is not None:
        wanted = list(cfg.providers)
        providers = [p for p in providers if p.name in wanted]
    else:
        providers = [p for p in providers if p.default]
    # The baseline first: the others are checked against it.
    providers.sort(key=lambda p: p.name != suite.baseline)
    modes = [m for m in suite.modes if cfg.modes is None or m in cfg.modes]
    problems = [
        p for p in suite.problems(device, cfg.quick)
        if (cfg.problems is None or p.name in cfg.problems)
        and (cfg.dtypes is None or p.dtype in cfg.dtypes)
    ]
    records: list[dict] = []
    progress = Progress(len(problems) * len(providers) * len(modes),
                        progress_desc or f"{suite.op} on {device.type}")
    try:
        for problem in problems:
            _run_problem(suite, problem, providers, modes, cfg, progress, records, started)
            if on_problem_done is not None:
                on_problem_done(records)
    finally:
        progress.close()
    return records


def _base_record(suite: Suite, problem: Problem, provider: Provider, mode: str) -> dict:
    rec = {
        "op": suite.op, "problem": problem.name, "shape": list(problem.shape),
        "dtype": dtype_name(problem.dtype), "mode": mode, "provider": provider.name,
        "provider_kind": provider.kind, "status": "ok", "error": None,
        "params": dict(problem.params), "min_bytes": int(suite.min_bytes(problem, mode)),
    }
    flops = suite.flops(problem, mode)
    if flops is not None:
        rec["flops"] = int(flops)
    return rec


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_problem(suite, problem, providers, modes, cfg, progress, records, started):
    device = cfg.device

    def out_of_time() -> bool:
        return cfg.max_time_s is not None and time.perf_counter() - started > cfg.max_time_s

    def skip_all(provider, status, error, modes_=modes):
        for mode in modes_:
            rec = _base_record(suite, problem, provider, mode)
            rec.update(status=status, error=error)
            records.append(rec)
            progress.finish(f"{problem.label} {mode} {provider.name}", status)

    if out_of_time():
        for provider in providers:
            skip_all(provider, "skipped", "time budget (--max-time) exhausted")
        return

    copies: list[Inputs] = []
    try:
        seed = zlib.crc32(f"{suite.op} {problem.name} {problem.dtype}".encode())
        gen = torch.Generator(device=device).manual_seed(seed)
        first = suite.make_inputs(problem, device, gen)
        n_copies = _copies_for(first.nbytes, device, cfg.max_copies)
        copies = [first] + [suite.make_inputs(problem, device, gen) for _ in range(n_copies - 1)]
    except Exception as e:  # noqa: BLE001 - e.g. out of memory: record and go on
        copies = []
        _free(device)
        for provider in providers:
            skip_all(provider, "error", f"making inputs: {type(e).__name__}: {_one_line(e)}")
        return

    # Set every provider up: one untimed full step on copy 0 (compiles, autotunes, loads
    # modules), which also gives the check against the baseline and the output's shape.
    baseline: tuple | None = None
    ready: dict[str, dict] = {}
    by_name = {p.name: p for p in providers}
    for provider in providers:
        if out_of_time():
            skip_all(provider, "skipped", "time budget (--max-time) exhausted")
            continue
        progress.start(f"{problem.label} {provider.name} setup")
        try:
            own = copies if provider.inputs is None else [provider.inputs(c) for c in copies]
            fn = provider.make(problem)
            t0 = time.perf_counter()
            c = own[0]
            out = _as_tuple(fn(*c.args, **c.kwargs))
            grads = (torch.autograd.grad(out, c.grad_tensors, [_grad_output(o, 0) for o in out])
                     if c.grad_tensors else ())
            _sync(device)
            setup_s = time.perf_counter() - t0
            check = None
            if cfg.check and provider.check:
                if provider.name == suite.baseline:
                    baseline = (tuple(o.detach() for o in out), grads)
                elif baseline is not None:
                    check = _check(out, grads, baseline, suite.tolerance(problem))
            grad_outs = [[_grad_output(o, i) for o in out] for i in range(len(copies))]
            del out, grads
        except Exception as e:  # noqa: BLE001 - compile failures etc.: record, continue
            own = None
            _free(device)
            skip_all(provider, _status_of(e), f"setup: {type(e).__name__}: {_one_line(e)}")
            continue
        ready[provider.name] = {"fn": fn, "grad_outs": grad_outs, "setup_s": setup_s,
                                "check": check, "copies": own}
    baseline = None

    # Time each mode with the providers' repeats interleaved, then measure memory.
    for mode in modes:
        recs: dict[str, dict] = {}
        for name, state in ready.items():
            rec = _base_record(suite, problem, by_name[name], mode)
            rec.update(setup_s=state["setup_s"], copies=len(copies))
            if state["check"] is not None:
                rec["check"] = state["check"]
            recs[name] = rec
        if out_of_time():
            for name, rec in recs.items():
                rec.update(status="skipped", error="time budget (--max-time) exhausted")
                records.append(rec)
                progress.finish(f"{problem.label} {mode} {name}", "skipped")
            continue
        progress.start(f"{problem.label} {mode}")

        def failed(name, e, _recs=recs):
            _recs[name].update(status=_status_of(e), error=f"{type(e).__name__}: {_one_line(e)}")

        timers: dict[str, StepTimer] = {}
        fns: dict[str, tuple] = {}
        for name, state in ready.items():
            try:
                fns[name] = _mode_fns(state["fn"], state["copies"], state["grad_outs"], mode)
            except Exception as e:  # noqa: BLE001
                failed(name, e)
                continue
            timers[name] = StepTimer(*fns[name], len(copies), cfg)
        for name, timing in time_interleaved(timers, failed).items():
            recs[name].update(timing)
        del timers
        for name, rec in recs.items():
            if rec["status"] == "ok" and cfg.measure_memory:
                try:
                    rec.update(measure_memory(*fns[name], device))
                except Exception as e:  # noqa: BLE001
                    failed(name, e)
            if rec["status"] == "ok":
                seconds = rec["time_ms"] / 1e3
                rec["gbps"] = rec["min_bytes"] / seconds / 1e9 if seconds > 0 else None
                if rec.get("flops") is not None and seconds > 0:
                    rec["tflops"] = rec["flops"] / seconds / 1e12
                outcome = f"{rec['time_ms']:.3f} ms"
            else:
                outcome = rec["status"]
                _free(device)
            records.append(rec)
            progress.finish(f"{problem.label} {mode} {name}", outcome)
        del fns
    del ready, copies
    _free(device)


def _mode_fns(fn, copies: list[Inputs], grad_outs: list, mode: str):
    """(prepare(i) -> state, step(i, state) -> result) for one mode. Only step is timed."""

    def forward(i):
        c = copies[i]
        return fn(*c.args, **c.kwargs)

    def backward(i, out):
        c = copies[i]
        return torch.autograd.grad(_as_tuple(out), c.grad_tensors, grad_outs[i])

    if mode in ("backward", "full") and not copies[0].grad_tensors:
        raise NotImplementedError(f"mode {mode!r} needs inputs that require grad")

    if mode == "forward":
        return (lambda i: None), (lambda i, state: forward(i))
    if mode == "backward":
        return forward, backward
    if mode == "full":
        return (lambda i: None), (lambda i, state: backward(i, forward(i)))
    raise ValueError(f"unknown mode {mode!r}")


# --------------------------------------------------------------------------------------------
# The run's header
# --------------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _fastseg_version() -> str:
    try:
        import fastseg

        version = getattr(fastseg, "__version__", None)
        if version:
            return str(version)
    except Exception:  # noqa: BLE001 - a broken build must not stop the benchmark
        pass
    try:
        from importlib.metadata import version

        return version("fastseg")
    except Exception:  # noqa: BLE001
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv: Sequence[str] | None = None) -> dict[str, Any]:
    header: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in (sys.argv if argv is None else argv)),
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastseg": _fastseg_version(),
        "cpu": _cpu_name(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        header["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        header["triton"] = None
    commit = os.environ.get("FASTSEG_GIT_COMMIT") or _git("rev-parse", "HEAD")
    header["git_commit"] = commit
    status = _git("status", "--porcelain", "--untracked-files=no")
    header["git_dirty"] = None if status is None else bool(status)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        header["device_name"] = props.name
        header["gpu"] = {
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1),
            "l2_MiB": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
        try:
            header["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            header["driver"] = None
    else:
        header["device_name"] = header["cpu"]
    try:
        from fastseg import _build_info

        header["fastseg_build"] = _build_info.BUILD_INFO
    except Exception:  # noqa: BLE001
        header["fastseg_build"] = None
    return header


# --------------------------------------------------------------------------------------------
# Reports: JSON, markdown, PNG
# --------------------------------------------------------------------------------------------


def write_json(result: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
        f.write("\n")
    os.replace(tmp, path)


def _ops_of(result: dict) -> list[str]:
    ops = list(result.get("suites", {}))
    for r in result["records"]:
        if r["op"] not in ops:
            ops.append(r["op"])
    return ops


def _groups(records: list[dict]) -> list[tuple[str, str]]:
    groups: list[tuple[str, str]] = []
    for r in records:
        key = (r["problem"], r["dtype"])
        if key not in groups:
            groups.append(key)
    return groups


def _provider_order(result: dict, op: str, records: list[dict]) -> list[str]:
    info = result.get("suites", {}).get(op, {})
    order = list(info.get("providers", {}))
    for r in records:
        if r["provider"] not in order:
            order.append(r["provider"])
    present = {r["provider"] for r in records}
    rank = {"eager": 0, "compile": 1, "reference": 2, "fused": 3}
    kinds = {r["provider"]: r.get("provider_kind", "fused") for r in records}
    return sorted((p for p in order if p in present),
                  key=lambda p: (rank.get(kinds.get(p, "fused"), 3), order.index(p)))


def _index(records: list[dict]) -> dict[tuple, dict]:
    return {(r["problem"], r["dtype"], r["mode"], r["provider"]): r for r in records}


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok" and r.get("time_ms") is not None


def _short_dtype(name: str) -> str:
    try:
        return DTYPE_SHORT.get(parse_dtype(name), name)
    except ValueError:
        return name


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def render_markdown(result: dict) -> str:
    h = result["header"]
    lines = [f"# fastseg benchmark: {h.get('device_name', h.get('device'))}", ""]
    commit = h.get("git_commit") or "unknown"
    if h.get("git_dirty"):
        commit += " (dirty tree)"
    lines += [
        f"- date: {h.get('date')}; commit: {commit}; fastseg {h.get('fastseg')}",
        f"- torch {h.get('torch')}, CUDA {h.get('cuda')}, triton {h.get('triton')}, "
        f"Python {h.get('python')}, {h.get('torch_threads')} CPU threads"
        + (f", driver {h['driver']}" if h.get("driver") else ""),
        f"- command: `{h.get('command')}`",
    ]
    if h.get("copy_bandwidth_GBps"):
        lines.append(
            f"- device copy bandwidth: {h['copy_bandwidth_GBps']:.1f} GB/s "
            f"(copy of {h['copy_bytes'] / 2**20:.0f} MiB, bytes read + written); "
            "floor = minimal bytes / this bandwidth")
    if not h.get("complete", True):
        lines.append("- **incomplete run** (cut short): the records below are what finished")
    lines.append("- times: median over repeats (inputs rotated over several copies), ms; "
                 "speedup = other provider's time / this provider's time")
    lines.append("")
    for op in _ops_of(result):
        lines += _render_op(result, op)
    return "\n".join(lines).rstrip() + "\n"


def _render_op(result: dict, op: str) -> list[str]:
    info = result.get("suites", {}).get(op, {})
    records = [r for r in result["records"] if r["op"] == op]
    lines = [f"## {info.get('title') or op}", ""]
    if info.get("bytes_model"):
        lines += [f"Minimal bytes: {info['bytes_model']}", ""]
    ran = {r["provider"] for r in records}
    for name, p in info.get("providers", {}).items():
        if p.get("note") and name in ran:
            lines.append(f"- `{name}`: {p['note']}")
    for name, reason in info.get("unavailable", {}).items():
        lines.append(f"- `{name}`: not run ({_md_escape(reason)})")
    lines.append("")
    if not records:
        return lines + ["(no records)", ""]
    providers = _provider_order(result, op, records)
    kinds = {r["provider"]: r.get("provider_kind") for r in records}
    baseline = info.get("baseline", "eager")
    compiled = [p for p in providers if kinds.get(p) == "compile"]
    candidates = [p for p in providers if kinds.get(p) in ("fused", "reference")]
    index = _index(records)
    groups = _groups(records)
    shapes = {(r["problem"], r["dtype"]): "x".join(map(str, r["shape"])) for r in records}
    modes = [m for m in info.get("modes", MODES) if any(r["mode"] == m for r in records)]

    for mode in modes:
        lines.append(f"### {MODE_TITLES.get(mode, mode)}: time, ms")
        lines.append("")
        head = ["problem", "shape", "dtype"] + providers
        for c in candidates:
            if baseline in providers:
                head.append(f"{c} vs {baseline}")
            for comp in compiled:
                head.append(f"{c} vs {comp}")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        for problem, dtype in groups:
            row = [problem, shapes[(problem, dtype)], _short_dtype(dtype)]
            times = {p: index.get((problem, dtype, mode, p)) for p in providers}
            ok_times = [r["time_ms"] for r in times.values() if _ok(r)]
            best = min(ok_times) if ok_times else None
            for p in providers:
                r = times[p]
                if _ok(r):
                    cell = f"{r['time_ms']:.3f}"
                    row.append(f"**{cell}**" if r["time_ms"] == best and len(ok_times) > 1
                               else cell)
                else:
                    row.append(r["status"] if r else "-")
            for c in candidates:
                others = ([baseline] if baseline in providers else []) + compiled
                for other in others:
                    rc, ro = times[c], times[other]
                    row.append(f"{ro['time_ms'] / rc['time_ms']:.2f}x"
                               if _ok(rc) and _ok(ro) else "-")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    summary = info.get("summary") or []
    if summary:
        lines += [*summary, ""]

    flops = any(r.get("flops") is not None for r in records)  # a TFLOP/s column
    lines.append(f"### {op}: every record")
    lines.append("")
    lines.append("| problem | dtype | mode | provider | time ms (p20-p80) | GB/s | "
                 + ("TFLOP/s | " if flops else "")
                 + "% of floor | peak MiB | kept MiB | check |")
    lines.append("|---|---|---|---|---:|---:|" + ("---:|" if flops else "")
                 + "---:|---:|---:|---|")
    bandwidth = result["header"].get("copy_bandwidth_GBps")
    for problem, dtype in groups:
        for mode in modes:
            for p in providers:
                r = index.get((problem, dtype, mode, p))
                if r is None:
                    continue
                row = [problem, _short_dtype(dtype), mode, p]
                if _ok(r):
                    row.append(f"{r['time_ms']:.3f} ({r['time_ms_p20']:.3f}-"
                               f"{r['time_ms_p80']:.3f})")
                    row.append(f"{r['gbps']:.1f}" if r.get("gbps") else "-")
                    if flops:
                        row.append(f"{r['tflops']:.3g}" if r.get("tflops") else "-")
                    floor = r.get("floor_fraction")
                    row.append(f"{100 * floor:.0f}%" if floor is not None and bandwidth else "-")
                    row.append(_mib(r.get("peak_bytes")))
                    row.append(_mib(r.get("retained_bytes")) if mode == "forward" else "-")
                    chk = r.get("check")
                    if chk is None:
                        row.append("baseline" if p == baseline else "-")
                    else:
                        row.append(("ok" if chk["ok"] else "**MISMATCH**")
                                   + f" ({chk['rel_err']:.1e})")
                else:
                    row.append(f"{r['status']}: {_md_escape(r.get('error') or '')[:160]}")
                    row += ["-"] * (6 if flops else 5)
                lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return lines


PROVIDER_COLORS = {
    "eager": "#8c8c8c",
    "compile": "#ff7f0e",
    "reference": "#c9b458",
    "fastseg-cuda": "#2ca02c",
    "fastseg-triton": "#1f77b4",
    "fastseg-cpu": "#9467bd",
}
_EXTRA_COLORS = ["#d62728", "#17becf", "#e377c2", "#8c564b", "#bcbd22"]


def _fmt_value(metric: str, value: float) -> str:
    if metric == "time_ms":
        return f"{value:.3g} ms"
    return f"{value / 2**20:.3g} MiB"


def plot_op(result: dict, op: str, path: str) -> str | None:
    """One PNG per op: rows = modes; left = time, right = peak memory, each relative to the
    baseline (eager = 1, lower is better), grouped bars per (problem, dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    info = result.get("suites", {}).get(op, {})
    records = [r for r in result["records"] if r["op"] == op]
    if not records:
        return None
    baseline = info.get("baseline", "eager")
    providers = _provider_order(result, op, records)
    colors = {}
    extra = iter(_EXTRA_COLORS * 4)
    for p in providers:
        colors[p] = PROVIDER_COLORS.get(p) or next(extra)
    groups = _groups(records)
    shapes = {(r["problem"], r["dtype"]): "x".join(map(str, r["shape"])) for r in records}
    index = _index(records)
    modes = [m for m in info.get("modes", MODES) if any(r["mode"] == m for r in records)]
    metrics = [("time_ms", "time"), ("peak_bytes", "peak memory")]

    panel_w = max(6.0, 0.32 * len(providers) * len(groups) + 1.5)
    top_in = 0.85  # inches above the panels: the title (2 lines) and the legend
    # Few bars: time and memory side by side, one row per mode. Many: one column, a row per
    # (mode, metric), so the picture stays about as wide as a screen.
    side_by_side = len(providers) * len(groups) <= 24
    n_rows = len(modes) * (1 if side_by_side else len(metrics))
    n_cols = len(metrics) if side_by_side else 1
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(panel_w * n_cols, (3.6 if side_by_side else 3.2) * n_rows
                                      + top_in))
    width = 0.8 / len(providers)
    for m, mode in enumerate(modes):
        for col, (metric, label) in enumerate(metrics):
            ax = axes[m][col] if side_by_side else axes[m * len(metrics) + col][0]
            ticks = []
            top = 1.0
            for gi, (problem, dtype) in enumerate(groups):
                recs = {p: index.get((problem, dtype, mode, p)) for p in providers}
                values = {p: r.get(metric) for p, r in recs.items()
                          if _ok(r) and r.get(metric) is not None}
                base = values.get(baseline)
                note = f"{baseline} {_fmt_value(metric, base)}" if base else ""
                if not base:
                    positive = [v for v in values.values() if v]
                    base = min(positive) if positive else None
                    note = "(no eager: rel. to best)" if base else "(no data)"
                ticks.append(f"{problem}\n{shapes[(problem, dtype)]}\n"
                             f"{_short_dtype(dtype)}\n{note}")
                for pi, p in enumerate(providers):
                    x = gi + (pi - (len(providers) - 1) / 2) * width
                    if p in values and base:
                        v = values[p] / base
                        top = max(top, v)
                        ax.bar(x, v, width * 0.95, color=colors[p])
                        if p != baseline:
                            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7,
                                    rotation=90 if len(providers) * len(groups) > 24 else 0)
                    else:
                        r = recs[p]
                        status = "n/a" if r is None else r["status"]
                        if r is not None and r["status"] == "ok":
                            status = "n/a"  # measured, but not this metric
                        ax.text(x, 0.02, status, ha="center", va="bottom", fontsize=7,
                                rotation=90, color="#b00000")
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
            for gi in range(1, len(groups)):  # separate the dtypes
                if groups[gi][1] != groups[gi - 1][1]:
                    ax.axvline(gi - 0.5, color="#444444", lw=0.8)
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(ticks, fontsize=8)
            ax.set_xlim(-0.6, len(groups) - 0.4)
            ax.set_ylim(0, top * 1.18)
            ax.set_ylabel(f"{label} / {baseline}\n(lower is better)", fontsize=9)
            ax.set_title(f"{MODE_TITLES.get(mode, mode)}: {label}", fontsize=10)
            ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=colors[p], label=p) for p in providers]
    fig_h = fig.get_figheight()
    # Lay the panels out first, then put the title and legend into the space left on top.
    fig.tight_layout(rect=(0, 0, 1, 1 - top_in / fig_h))
    h = result["header"]
    fig.suptitle(
        f"{info.get('title') or op} on {h.get('device_name')}: fastseg vs eager vs "
        f"torch.compile (bars relative to {baseline}; lower is better)\n"
        f"torch {h.get('torch')}, triton {h.get('triton')}, commit "
        f"{(h.get('git_commit') or 'unknown')[:12]}, {h.get('date')}",
        fontsize=10, y=1 - 0.06 / fig_h, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=len(providers), fontsize=9,
               frameon=False, bbox_to_anchor=(0.5, 1 - 0.5 / fig_h))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_reports(result: dict, out_dir: str, plot: bool = True,
                  quiet: bool = False) -> dict[str, str | None]:
    """results.json, results.md and <op>.png in out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths: dict[str, str | None] = {"json": os.path.join(out_dir, RESULTS_JSON)}
    write_json(result, paths["json"])
    markdown = render_markdown(result)
    paths["markdown"] = os.path.join(out_dir, RESULTS_MD)
    with open(paths["markdown"], "w") as f:
        f.write(markdown)
    if plot:
        for op in _ops_of(result):
            png = plot_op(result, op, os.path.join(out_dir, f"{op}.png"))
            paths[f"png:{op}"] = png
            if png is None and not quiet:
                print("note: matplotlib is not installed (or no records): no chart for "
                      f"{op}; render later with --from-json", file=sys.stderr)
    return paths


# --------------------------------------------------------------------------------------------
# Driving a run; the CLI
# --------------------------------------------------------------------------------------------


def _finish_records(records: list[dict], header: dict) -> None:
    bandwidth = header.get("copy_bandwidth_GBps")
    for r in records:
        if _ok(r) and bandwidth:
            floor_ms = r["min_bytes"] / (bandwidth * 1e9) * 1e3
            r["floor_ms"] = floor_ms
            r["floor_fraction"] = floor_ms / r["time_ms"]


def run(suites: Sequence[Suite], cfg: RunConfig, out_dir: str | None,
        argv: Sequence[str] | None = None, plot: bool = True,
        print_markdown: bool = True) -> dict:
    """Run suites, write results.json / results.md / <op>.png into out_dir; return the result."""
    started = time.perf_counter()
    device = cfg.device
    header = environment(device, argv)
    header["quick"] = cfg.quick
    header["complete"] = False
    try:
        header.update(copy_bandwidth(device, cfg.copy_bytes,
                                     cfg=RunConfig.for_device(device, quick=True)))
    except Exception as e:  # noqa: BLE001
        header["copy_bandwidth_error"] = f"{type(e).__name__}: {_one_line(e)}"
    result: dict[str, Any] = {"schema": SCHEMA, "header": header, "suites": {}, "records": []}

    def save(_records=None):
        _finish_records(result["records"], header)
        if out_dir is not None:
            os.makedirs(out_dir, exist_ok=True)
            write_json(result, os.path.join(out_dir, RESULTS_JSON))

    for suite in suites:
        providers = suite.providers(device)
        result["suites"][suite.op] = {
            "title": suite.title or suite.op,
            "baseline": suite.baseline,
            "modes": list(suite.modes),
            "bytes_model": suite.bytes_model,
            "providers": {p.name: {"kind": p.kind, "note": p.note, "default": p.default}
                          for p in providers},
            "unavailable": suite.unavailable(device),
        }
        done_before = len(result["records"])

        def summarize(records, _suite=suite):
            try:
                lines = list(_suite.summary(records, header))
            except Exception as e:  # noqa: BLE001 - a report bug must not lose the records
                lines = [f"(summary failed: {type(e).__name__}: {_one_line(e)})"]
            if lines:
                result["suites"][_suite.op]["summary"] = lines

        def on_problem_done(records, _base=done_before):
            result["records"][_base:] = records
            summarize(records)
            save()

        records = run_suite(suite, cfg, providers, on_problem_done=on_problem_done,
                            started=started)
        result["records"][done_before:] = records
        summarize(records)
        save()
    header["complete"] = True
    header["elapsed_s"] = round(time.perf_counter() - started, 1)
    _finish_records(result["records"], header)
    if out_dir is not None:
        paths = write_reports(result, out_dir, plot=plot)
        result["_paths"] = paths
    if print_markdown:
        print(render_markdown(result), flush=True)
    return result


def failures(result: dict) -> list[str]:
    """What makes a run fail: a fused or baseline provider that errored, or a failed check.
    (A torch.compile failure is recorded but is not fastseg's failure.)"""
    problems = []
    for r in result["records"]:
        kind = r.get("provider_kind")
        where = f"{r['op']} {r['problem']} {r['dtype']} {r['mode']} {r['provider']}"
        if r["status"] == "error" and kind in ("fused", "eager", "reference"):
            problems.append(f"{where}: {r.get('error')}")
        chk = r.get("check")
        if r["mode"] == "full" and chk is not None and not chk["ok"] and kind == "fused":
            problems.append(f"{where}: check failed (rel err {chk['rel_err']:.2e} > "
                            f"{chk['tolerance']:.0e})")
    return problems


def _split(values: Sequence[str] | None) -> list[str] | None:
    if not values:
        return None
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def build_parser(registry: dict[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastseg bench",
        description="Benchmark fastseg's fused ops against eager PyTorch and torch.compile: "
                    "forward, backward and full step; time, peak memory, GB/s.")
    parser.add_argument("--quick", action="store_true",
                        help="a couple of shapes and few repeats (about 1-2 minutes on CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="default: cuda if available, else cpu")
    parser.add_argument("--out", default="bench-out", metavar="DIR",
                        help=f"where {RESULTS_JSON}, {RESULTS_MD} and <op>.png go "
                             "(default: bench-out)")
    parser.add_argument("--ops", action="append", metavar="OP[,OP]",
                        help=f"op suites to run (default: all): {', '.join(registry)}")
    parser.add_argument("--providers", action="append", metavar="NAME[,NAME]",
                        help="only these providers (e.g. eager,compile,fastseg-cuda,reference)")
    parser.add_argument("--modes", action="append", metavar="MODE[,MODE]",
                        help=f"only these modes ({', '.join(MODES)})")
    parser.add_argument("--shapes", action="append", metavar="NAME[,NAME]",
                        help="only these problems (by name, e.g. cityscapes,cpu-target)")
    parser.add_argument("--dtypes", action="append", metavar="DTYPE[,DTYPE]",
                        help="only these dtypes (float32, bfloat16, ...)")
    parser.add_argument("--reps", type=int, metavar="N",
                        help="timed repeats per run (min = max = N)")
    parser.add_argument("--max-time", type=float, metavar="S",
                        help="start no new run after S seconds (the rest is recorded skipped)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--no-check", action="store_true",
                        help="skip comparing each provider's results with eager's")
    parser.add_argument("--no-plot", action="store_true", help="write no PNG")
    parser.add_argument("--from-json", metavar="FILE",
                        help="only render results.md and the charts from FILE into --out")
    parser.add_argument("--list", action="store_true",
                        help="list each suite's problems and providers, run nothing")
    return parser


def load_suite(module_name: str) -> Suite:
    module = importlib.import_module(module_name)
    suite = getattr(module, "SUITE", None)
    if suite is None:
        suite = module.make_suite()
    return suite


def cli(argv: Sequence[str] | None, registry: dict[str, str]) -> int:
    parser = build_parser(registry)
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
        paths = write_reports(result, args.out, plot=not args.no_plot)
        print(render_markdown(result), flush=True)
        print(f"wrote {', '.join(p for p in paths.values() if p)}", file=sys.stderr)
        return 0

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    ops = _split(args.ops) or list(registry)
    unknown = [op for op in ops if op not in registry]
    if unknown:
        parser.error(f"unknown op suite(s) {', '.join(unknown)}; known: {', '.join(registry)}")
    suites = [load_suite(registry[op]) for op in ops]

    if args.list:
        for suite in suites:
            print(f"{suite.op}:")
            for p in suite.problems(device, args.quick):
                print(f"  problem  {p.label}")
            for p in suite.providers(device):
                print(f"  provider {p.name} ({p.kind}{'' if p.default else ', on request'})"
                      f"{': ' + p.note if p.note else ''}")
            for name, reason in suite.unavailable(device).items():
                print(f"  not live {name}: {reason}")
        return 0

    dtypes = [parse_dtype(d) for d in _split(args.dtypes)] if args.dtypes else None
    cfg = RunConfig.for_device(
        device, args.quick,
        providers=_split(args.providers), modes=_split(args.modes),
        problems=_split(args.shapes), dtypes=dtypes,
        min_reps=args.reps, max_reps=args.reps,
        measure_memory=not args.no_memory, check=not args.no_check,
        max_time_s=args.max_time,
    )
    command = ["fastseg", "bench", *(sys.argv[1:] if argv is None else argv)]
    result = run(suites, cfg, args.out, argv=command, plot=not args.no_plot)
    paths = result.get("_paths", {})
    print(f"wrote {', '.join(p for p in paths.values() if p)}", file=sys.stderr)
    failed = failures(result)
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed else 0
