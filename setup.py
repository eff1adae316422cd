"""Builds the fastseg extensions (metadata lives in pyproject.toml).

- fastseg._C: the op schemas and the CPU kernels, always. Each csrc/cpu/<op>.cpp is compiled
  once per CPU capability (DEFAULT, AVX2, AVX512 on x86-64) because ATen's at::vec::Vectorized
  only vectorizes in a translation unit built with the matching -m flags; the kernel picks
  the variant at run time.
- fastseg._C_cuda: the CUDA kernels, when torch is a CUDA build and nvcc is found, or
  FASTSEG_BUILD_CUDA=1 forces them (FASTSEG_BUILD_CUDA=0 skips them). Never decided by
  torch.cuda.is_available(): build hosts often have no GPU. A module of its own, so that
  adding the CUDA kernels to a CPU-only build (`make demo`, then `make test`) compiles only
  them: fastseg._C is compiled with the same commands either way.
- FASTSEG_BUILD_EXT=0 skips the extensions entirely (pure-Python install: reference backend).
- Architectures: TORCH_CUDA_ARCH_LIST if set, else "8.0;9.0+PTX".

Incremental: every object is built by ninja in a persistent folder per Python and torch
version, build/<python>-torch<version>/ (an editable install too, whose build folder would
otherwise be a new temporary one each time), so a rebuild compiles only what changed - a
source, a header it includes, or its command. MAX_JOBS compile jobs (default: one per core).
How it was built is written to fastseg/_build_info.py and shown by `fastseg info`.
"""

from __future__ import annotations

import concurrent.futures
import glob
import os
import platform
import pprint
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0+PTX"


def env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def log(message):
    print(f"[fastseg build] {message}", flush=True)


def cpu_capabilities():
    """The CPU capability builds and their extra compiler flags."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {"DEFAULT": []}
    return {
        "DEFAULT": [],
        "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                   # GCC 12 warns falsely on its own AVX-512 intrinsics (GCC bug 105593).
                   "-Wno-maybe-uninitialized"],
    }


def find_cuda_home():
    """CUDA_HOME for torch's extension builder when the environment does not set it.

    torch guesses dirname(dirname(which nvcc)), which is wrong when nvcc on PATH is a
    wrapper script (as /usr/local/bin/nvcc is here); take the first candidate that holds
    both bin/nvcc and the CUDA runtime library.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        has_runtime = any(glob.glob(os.path.join(home, lib, "libcudart.so*"))
                          for lib in ("lib64", "lib"))
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and has_runtime:
            os.environ["CUDA_HOME"] = home
            return


def usable_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ninja_escape(path):
    """A path as a ninja build statement reads it."""
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def build_objects(jobs, build_dir, use_ninja):
    """Compile [(source, object, command args)] with ninja in build_dir (only what is out of
    date: ninja tracks each object's sources, the headers they include and its command), or,
    without ninja, every one of them."""
    os.makedirs(build_dir, exist_ok=True)
    if not use_ninja:
        log("ninja not found: compiling every CPU kernel object (pip install ninja to build "
            "incrementally)")

        def run(job):
            source, obj, args = job
            subprocess.run(args + ["-c", source, "-o", obj], check=True)

        with concurrent.futures.ThreadPoolExecutor(usable_cores()) as pool:
            list(pool.map(run, jobs))
        return
    lines = ["ninja_required_version = 1.3", "",
             "rule cxx",
             "  command = $args -MMD -MF $out.d -c $in -o $out",
             "  depfile = $out.d",
             "  deps = gcc",
             "  description = compiling $in ($capability)", ""]
    for source, obj, args in jobs:
        lines.append(f"build {ninja_escape(obj)}: cxx {ninja_escape(source)}")
        lines.append("  args = " + shlex.join(args).replace("$", "$$"))
        lines.append("  capability = " + obj.rsplit(".", 2)[-2])
    ninja_file = os.path.join(build_dir, "build.ninja")
    text = "\n".join(lines) + "\n"
    old = open(ninja_file).read() if os.path.exists(ninja_file) else None
    if old != text:  # rewritten only when it changes, as ninja reads its mtime
        with open(ninja_file, "w") as f:
            f.write(text)
    subprocess.run(["ninja", "-j", os.environ["MAX_JOBS"]], cwd=build_dir, check=True)


def main():
    build_ext_wanted = env_flag("FASTSEG_BUILD_EXT")
    if build_ext_wanted is False:
        info = {"extension": False, "reason": "FASTSEG_BUILD_EXT=0"}
        log("FASTSEG_BUILD_EXT=0: pure-Python install, the reference backend serves")
        setup(cmdclass={"build_py": build_py_with_info(info)})
        return

    find_cuda_home()
    import torch
    from torch.utils import cpp_extension

    cuda_wanted = env_flag("FASTSEG_BUILD_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    torch_has_cuda = torch.version.cuda is not None
    if cuda_wanted is None:
        build_cuda = torch_has_cuda and nvcc is not None and os.path.exists(nvcc)
        cuda_reason = (
            "built" if build_cuda
            else "torch is a CPU-only build" if not torch_has_cuda
            else "nvcc not found (set CUDA_HOME)"
        )
    else:
        build_cuda = cuda_wanted
        cuda_reason = "forced by FASTSEG_BUILD_CUDA=1" if cuda_wanted else "FASTSEG_BUILD_CUDA=0"
    if build_cuda and not torch_has_cuda:
        raise SystemExit("FASTSEG_BUILD_CUDA=1 but the installed torch is a CPU-only build")

    os.environ.setdefault("MAX_JOBS", str(usable_cores()))  # read by torch's builder too
    build_root = os.path.join(ROOT, "build", f"{sys.implementation.cache_tag}-torch{torch.__version__}")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without the flag the
    # pragma is ignored and every kernel runs on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp",
                 f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    capabilities = cpu_capabilities()
    cpu_kernel_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-warn-spills",
                  "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    archs = None
    cuda_include_dirs = list(include_dirs)
    if build_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        # torch's headers include CUDA library headers that the torch wheel ships here.
        wheel_cuda_include = os.path.join(
            os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(wheel_cuda_include):
            cuda_include_dirs.append(wheel_cuda_include)

    info = {
        "extension": True,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": build_cuda,
        "cuda_reason": cuda_reason,
        "cuda_home": cuda_home,
        "cuda_archs": archs,
        "cpu_capabilities": list(capabilities),
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if build_cuda else None,
        "compiler": os.environ.get("CXX", "c++"),
        "python": platform.python_version(),
        "build_dir": os.path.relpath(build_root, ROOT),
    }
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA kernels: {cuda_reason}"
        + (f", archs {archs}" if build_cuda else ""))
    log(f"CPU capabilities: {info['cpu_capabilities']}; build folder {info['build_dir']}, "
        f"{os.environ['MAX_JOBS']} jobs")

    def cpu_kernel_objects():
        """[(source, object, compile args)]: each csrc/cpu file once per capability (the
        DEFAULT build holds the dispatch and the op registrations)."""
        # torch's and Python's headers as system headers: -Wall for fastseg's code only.
        system_includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
        base = [os.environ.get("CXX", "c++"), "-fPIC", "-DNDEBUG", "-Wall", *cxx_flags,
                "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                *[f"-DFASTSEG_HAVE_CPU_{name}=1" for name in capabilities if name != "DEFAULT"],
                *[f"-I{d}" for d in include_dirs], *[f"-isystem{d}" for d in system_includes]]
        out_dir = os.path.join(build_root, "_C", "cpu")
        jobs = []
        for source in cpu_kernel_sources:
            stem = os.path.splitext(os.path.basename(source))[0]
            for name, flags in capabilities.items():
                dispatch = ["-DFASTSEG_CPU_DISPATCH_UNIT=1"] if name == "DEFAULT" else []
                jobs.append((source, os.path.join(out_dir, f"{stem}.{name}.o"),
                             base + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}",
                                     *dispatch, *flags]))
        return jobs, out_dir

    class BuildExtension(cpp_extension.BuildExtension):
        """Each extension in its own folder under build_root; fastseg._C gets the CPU kernel
        objects (compiled by build_objects) linked in."""

        def finalize_options(self):
            super().finalize_options()
            # Always link, and let ninja decide what to compile: setuptools' own up-to-date
            # check reads the sources only (not the headers they include), and the library
            # it compares with may have been built against another torch.
            self.force = True

        def build_extension(self, ext):
            self.build_temp = os.path.join(build_root, ext.name.rsplit(".", 1)[-1])
            if ext.name == "fastseg._C":
                jobs, out_dir = cpu_kernel_objects()
                build_objects(jobs, out_dir, self.use_ninja)
                ext.extra_objects = [obj for _, obj, _ in jobs]
            super().build_extension(ext)

    module_source = os.path.join("csrc", "module.cpp")
    extensions = [cpp_extension.CppExtension(
        name="fastseg._C",
        sources=[os.path.join("csrc", "fastseg.cpp"), module_source],
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )]
    if build_cuda:
        extensions.append(cpp_extension.CUDAExtension(
            name="fastseg._C_cuda",
            sources=[module_source] + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            include_dirs=cuda_include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            py_limited_api=False,
        ))
    log("compile flags: " + shlex.join(cxx_flags))
    setup(ext_modules=extensions,
          cmdclass={"build_ext": BuildExtension, "build_py": build_py_with_info(info)})


def build_py_with_info(info):
    """build_py that writes fastseg/_build_info.py where the installed package reads it: in
    the build folder for a wheel, in the source tree for an editable install (so that a
    wheel built for another torch never rewrites the source tree's)."""

    class BuildPy(build_py):
        def run(self):
            super().run()
            package_dir = (os.path.join(ROOT, "fastseg") if getattr(self, "editable_mode", False)
                           else os.path.join(self.build_lib, "fastseg"))
            os.makedirs(package_dir, exist_ok=True)
            with open(os.path.join(package_dir, "_build_info.py"), "w") as f:
                f.write('"""How the fastseg extensions were built (written by setup.py)."""\n\n')
                f.write(f"BUILD_INFO = {pprint.pformat(info, width=100)}\n")

    return BuildPy


main()
