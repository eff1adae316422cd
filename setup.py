"""Builds the fastseg._C extension (metadata lives in pyproject.toml).

- CPU kernels always. Each csrc/cpu/<op>.cpp is compiled once per CPU capability (DEFAULT,
  AVX2, AVX512 on x86-64) because ATen's at::vec::Vectorized only vectorizes in a translation
  unit built with the matching -m flags; the kernel picks the variant at run time.
- CUDA kernels when torch is a CUDA build and nvcc is found, or FASTSEG_BUILD_CUDA=1 forces
  them (FASTSEG_BUILD_CUDA=0 skips them). Never decided by torch.cuda.is_available(): build
  hosts often have no GPU.
- FASTSEG_BUILD_EXT=0 skips the extension entirely (pure-Python install: reference backend).
- Architectures: TORCH_CUDA_ARCH_LIST if set, else "8.0;9.0+PTX".
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

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_PATH = os.path.join(ROOT, "fastseg", "_build_info.py")
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


def write_build_info(info):
    with open(BUILD_INFO_PATH, "w") as f:
        f.write('"""How fastseg._C was built (written by setup.py)."""\n\n')
        f.write(f"BUILD_INFO = {pprint.pformat(info, width=100)}\n")


def cpu_capabilities():
    """The extra CPU capability builds (beyond DEFAULT) and their compiler flags."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return {
        "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi2"],
        "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
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


def main():
    build_ext_wanted = env_flag("FASTSEG_BUILD_EXT")
    if build_ext_wanted is False:
        write_build_info({"extension": False, "reason": "FASTSEG_BUILD_EXT=0"})
        log("FASTSEG_BUILD_EXT=0: pure-Python install, the reference backend serves")
        setup()
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

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -fopenmp: at::parallel_for is inline OpenMP in ATen's headers; without the flag the
    # pragma is ignored and every kernel runs on one thread.
    cxx_flags = ["-O3", "-std=c++20", "-fvisibility=hidden", "-fopenmp",
                 f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    capabilities = cpu_capabilities()
    define_macros = [("FASTSEG_HAVE_CPU_" + name, "1") for name in capabilities]

    sources = [os.path.join("csrc", "fastseg.cpp")] + sorted(glob.glob("csrc/cpu/*.cpp"))
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "-Xptxas=-warn-spills",
                  "--expt-relaxed-constexpr", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    archs = None
    if build_cuda:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        define_macros.append(("FASTSEG_WITH_CUDA", "1"))
        # torch's headers include CUDA library headers that the torch wheel ships here.
        wheel_cuda_include = os.path.join(
            os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include")
        if os.path.isdir(wheel_cuda_include):
            include_dirs.append(wheel_cuda_include)

    info = {
        "extension": True,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": build_cuda,
        "cuda_reason": cuda_reason,
        "cuda_home": cuda_home,
        "cuda_archs": archs,
        "cpu_capabilities": ["DEFAULT"] + list(capabilities),
        "cxx_flags": cxx_flags,
        "nvcc_flags": nvcc_flags if build_cuda else None,
        "compiler": os.environ.get("CXX", "c++"),
        "python": platform.python_version(),
    }
    write_build_info(info)
    log(f"torch {torch.__version__} (CUDA {torch.version.cuda}); CUDA kernels: {cuda_reason}"
        + (f", archs {archs}" if build_cuda else ""))
    log(f"CPU capabilities: {info['cpu_capabilities']}")

    Extension = cpp_extension.CUDAExtension if build_cuda else cpp_extension.CppExtension

    class BuildExtension(cpp_extension.BuildExtension):
        """Adds the per-capability CPU objects: one compile of each csrc/cpu file per flag set."""

        def build_extension(self, ext):
            objects = self._compile_cpu_capabilities(ext)
            ext.extra_objects = list(ext.extra_objects or []) + objects
            super().build_extension(ext)

        def _compile_cpu_capabilities(self, ext):
            out_dir = os.path.join(self.build_temp, "cpu_capabilities")
            os.makedirs(out_dir, exist_ok=True)
            includes = (include_dirs + cpp_extension.include_paths()
                        + [sysconfig.get_paths()["include"]])
            base = [os.environ.get("CXX", "c++"), "-c", "-fPIC", *cxx_flags,
                    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
                    *[f"-I{d}" for d in includes]]
            jobs = []
            for name, flags in capabilities.items():
                for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))):
                    stem = os.path.splitext(os.path.basename(src))[0]
                    obj = os.path.join(out_dir, f"{stem}.{name}.o")
                    cmd = base + [f"-DCPU_CAPABILITY={name}", f"-DCPU_CAPABILITY_{name}",
                                  *flags, src, "-o", obj]
                    jobs.append((cmd, obj, src))

            def run(job):
                cmd, obj, src = job
                if os.path.exists(obj) and os.path.getmtime(obj) > max(
                        os.path.getmtime(p) for p in [src] + glob.glob(
                            os.path.join(ROOT, "csrc", "include", "fastseg", "*.h"))):
                    return obj
                log(f"compiling {os.path.relpath(src, ROOT)} for {obj.rsplit('.', 2)[-2]}")
                subprocess.run(cmd, check=True)
                return obj

            workers = max(1, min(len(jobs), os.cpu_count() or 1))
            with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                return list(pool.map(run, jobs))

    ext = Extension(
        name="fastseg._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros + [("CPU_CAPABILITY", "DEFAULT"),
                                       ("FASTSEG_CPU_DISPATCH_UNIT", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    log("compile command base: " + shlex.join(cxx_flags))
    setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})


main()
