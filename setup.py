"""Build of the `deferredseg` distribution and its extension `deferredseg_kernels._C`.

The extension needs the torch it will run with, so install with
``pip install --no-build-isolation .`` into an environment that already has torch.

Environment variables:
  DS_FORCE_CUDA=1      build the CUDA kernels (fails clearly when torch or nvcc cannot)
  DS_FORCE_CPU=1       build only the CPU kernels
  DS_NO_EXTENSION=1    pure-Python install: only the reference backend (and Triton)
  TORCH_CUDA_ARCH_LIST CUDA architectures (default "8.0;9.0+PTX": A100, H100/H200, PTX for newer)
  MAX_JOBS             parallel compile jobs (ninja)
  NVCC_THREADS         threads per nvcc invocation (default 2)
  DS_CPU_ISA_VARIANTS=0  build the CPU kernels for the baseline x86-64 only, not also for
                       AVX2 and AVX-512 (a third of their compile time; slower on CPUs that
                       have those: for test builds, as CI's older stacks)
Without DS_FORCE_*, CUDA kernels are built when torch is a CUDA build and nvcc is found.

The extension uses only Python's limited API (it registers its ops with TORCH_LIBRARY
and has a plain module init, no pybind11), so it is built as ``_C.abi3.so`` and its
wheel is tagged ``cp310-abi3``: one wheel per torch/CUDA build serves Python 3.10 and
later. The version is read from deferredseg_kernels/_version.py (pyproject.toml).
"""

import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# The oldest Python the abi3 extension serves: the Py_LIMITED_API value and the wheel tag.
LIMITED_API_HEX, LIMITED_API_TAG = "0x030A0000", "cp310"


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_includes():
    """Header folders of the nvidia-* wheels torch depends on.

    A CUDA toolkit installed without cuBLAS/cuSPARSE headers (common on build
    machines) cannot compile torch's CUDA headers alone; the wheels carry them.
    """
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    found = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return found


def _extensions():
    if _flag("DS_NO_EXTENSION"):
        print("deferredseg: DS_NO_EXTENSION=1, pure-Python install (reference backend only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "deferredseg: torch is not importable in the build environment, so the C++ "
            "extension is skipped. Install torch first and use "
            "`pip install --no-build-isolation .` to build it.",
            file=sys.stderr,
        )
        return [], {}

    force_cuda, force_cpu = _flag("DS_FORCE_CUDA"), _flag("DS_FORCE_CPU")
    if force_cuda and force_cpu:
        raise SystemExit("deferredseg: DS_FORCE_CUDA=1 and DS_FORCE_CPU=1 contradict each other")
    nvcc_found = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if force_cuda:
        if torch.version.cuda is None:
            raise SystemExit(
                f"deferredseg: DS_FORCE_CUDA=1 but the installed torch "
                f"{torch.__version__} is a CPU-only build; a CUDA extension needs a "
                f"CUDA build of torch"
            )
        if not nvcc_found:
            raise SystemExit(
                "deferredseg: DS_FORCE_CUDA=1 but nvcc was not found; set CUDA_HOME "
                "to the CUDA toolkit (e.g. CUDA_HOME=/usr/local/cuda)"
            )
    with_cuda = not force_cpu and torch.version.cuda is not None and nvcc_found

    sources = [os.path.join("csrc", "deferredseg.cpp")] + sorted(
        glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    )
    cxx = ["-O3", "-fdiagnostics-color=always"]
    link = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is OpenMP inline code: without -fopenmp it runs serially.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # Py_LIMITED_API: only the stable ABI of Python 3.10 (recent torch adds the same flag
    # for py_limited_api extensions; defined here too for the torch versions that do not).
    macros = [("DS_TORCH_VERSION", f'"{torch.__version__}"'), ("Py_LIMITED_API", LIMITED_API_HEX)]
    if os.environ.get("DS_CPU_ISA_VARIANTS", "1").strip() == "0":
        macros.append(("DS_NO_ISA_VARIANTS", None))
        print("deferredseg: DS_CPU_ISA_VARIANTS=0, CPU kernels for the baseline x86-64 only")
    kwargs = dict(
        extra_link_args=link, include_dirs=[os.path.join(HERE, "csrc")], py_limited_api=True
    )
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        macros += [("DS_WITH_CUDA", None), ("DS_CUDA_VERSION", f'"{torch.version.cuda}"')]
        nvcc = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2"), "-lineinfo"]
        kwargs["include_dirs"] += _nvidia_wheel_includes()
        ext = cpp_extension.CUDAExtension(
            "deferredseg_kernels._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            **kwargs,
        )
        print(
            f"deferredseg: building CPU and CUDA kernels (CUDA {torch.version.cuda}, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    else:
        ext = cpp_extension.CppExtension(
            "deferredseg_kernels._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            **kwargs,
        )
        why = (
            "DS_FORCE_CPU=1"
            if force_cpu
            else ("torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found")
        )
        print(f"deferredseg: building CPU kernels only ({why})")

    class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            if self.inplace:
                _remove_stale_inplace_builds(self)

    return [ext], {"build_ext": BuildExt}


def _remove_stale_inplace_builds(cmd):
    """Delete in-place builds of the extension under another file name.

    Python prefers ``_C.cpython-3XX-*.so`` (an older, version-specific build) over
    ``_C.abi3.so``, so a stale one would shadow the module just built.
    """
    for ext in cmd.extensions:
        built = os.path.abspath(cmd.get_ext_fullpath(ext.name))
        stem = ext.name.rsplit(".", 1)[-1]
        for other in glob.glob(os.path.join(os.path.dirname(built), stem + ".*.so")):
            if os.path.abspath(other) != built:
                os.remove(other)
                print(f"deferredseg: removed the stale build {os.path.relpath(other, HERE)}")


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(
        include=["deferredseg", "deferredseg.*", "deferredseg_kernels", "deferredseg_kernels.*"]
    ),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    # abi3 wheel tag; a pure-Python install (no extension) stays py3-none-any.
    options={"bdist_wheel": {"py_limited_api": LIMITED_API_TAG}} if ext_modules else {},
)
