"""hdnas packaging. ``kernels/`` installs as ``hdnas.kernels`` (the top-level name ``kernels`` is
taken on PyPI). torch is required but never pinned here, so a GPU user's own torch is kept and
a CPU machine is not made to download a CUDA build: install torch first (see README).

Native kernels (``csrc/``): ``pip install --no-build-isolation -e .`` builds the C++ CPU library
``hdnas/_native_cpu_<build tag>*.so`` (portable, AVX2 and AVX-512 kernels in one library, chosen
at run time, so no ``-march=native``: the tag is the machine type, see
hdnas.native_build.build_tag) with torch's BuildExtension (ninja), and the CUDA library when a
CUDA toolkit and a CUDA build of torch are present. torch is never a build requirement (that would
make pip fetch a CUDA torch into an isolated build env): without ``--no-build-isolation`` torch
is not importable here, the native build is skipped with one warning, and the library is built
just in time at first use instead (hdnas.native_build), from the sources that also ship as
package data (``hdnas/csrc``) for a non-editable install. ``HDNAS_BUILD_NATIVE``: ``0`` skips the
native build, ``1`` makes a failed build an error, ``auto`` (default) warns and goes on.
"""
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
MODE = os.environ.get("HDNAS_BUILD_NATIVE", "auto").strip().lower()
FORCE = MODE in ("1", "true", "yes", "on", "force")
SKIP = MODE in ("0", "false", "no", "off")


def _warn(msg):
    # one line on stderr (pip shows it with -v, or when something else fails)
    print(f"WARNING: hdnas: {msg}", file=sys.stderr)


def native_build_setup():
    """(ext_modules, cmdclass) for the native libraries, or ([], {}) when they cannot be built."""
    if SKIP:
        _warn("HDNAS_BUILD_NATIVE=0: native kernels not built (the Python backends are used)")
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except Exception as e:  # build isolation, or no torch yet
        msg = (f"torch is not importable at build time ({e}); native kernels not built now: "
               "they are built just in time at first use (use pip install --no-build-isolation "
               "to build them at install time)")
        if FORCE:
            raise RuntimeError(msg)
        _warn(msg)
        return [], {}

    cxx_bin = os.environ.get("CXX", "c++").split()[0]
    if shutil.which(cxx_bin) is None:
        msg = (f"no C++ compiler ({cxx_bin!r} not found; set CXX): native kernels not built "
               "(the Python backends are used; a JIT build is tried at first use)")
        if FORCE:
            raise RuntimeError(msg)
        _warn(msg)
        return [], {}

    # the sources and flags live in one place (hdnas/native_build.py), loaded without importing
    # hdnas
    import importlib.util
    spec = importlib.util.spec_from_file_location("_hdnas_native_build",
                                                  os.path.join(ROOT, "hdnas", "native_build.py"))
    nb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nb)
    # the CPU library is named for the machine type it runs on (any CPU of it: the vector ISA
    # is chosen at run time); the loader ignores libraries with another tag
    tag = nb.build_tag()
    cxx, nvcc = nb.CXX_FLAGS, nb.NVCC_FLAGS
    cpu_sources = [f"csrc/{n}" for n in nb.CPU_SOURCES]
    cuda_sources = [f"csrc/{n}" for n in nb.CUDA_SOURCES]

    inc = [os.path.join(ROOT, "csrc")]
    exts = [cpp_extension.CppExtension(f"hdnas._native_cpu_{tag}", cpu_sources, include_dirs=inc,
                                       extra_compile_args={"cxx": cxx},
                                       extra_link_args=["-fopenmp"])]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        exts.append(cpp_extension.CUDAExtension(
            "hdnas._native_cuda", cuda_sources, include_dirs=inc,
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc}))
    else:
        print("hdnas: no CUDA build of torch or no CUDA toolkit: CUDA kernels not built",
              file=sys.stderr)

    class BuildNative(cpp_extension.BuildExtension):
        """Builds each native library; a failure warns (names the cause) instead of failing the
        install, unless HDNAS_BUILD_NATIVE=1."""

        def build_extensions(self):
            self._hdnas_failed = set()
            super().build_extensions()
            # a failed library is no output: nothing tries to copy or install it afterwards
            self.extensions = [e for e in self.extensions if e.name not in self._hdnas_failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # compiler missing, compile error, ...
                if FORCE:
                    raise
                self._hdnas_failed.add(ext.name)
                _warn(f"building {ext.name} failed ({type(e).__name__}: {e}); the package is "
                      "installed without it (it is retried just in time at first use; "
                      "HDNAS_BUILD_NATIVE=0 skips native kernels)")

    return exts, {"build_ext": BuildNative.with_options(use_ninja=True)}


ext_modules, cmdclass = native_build_setup()

setup(
    name="hdnas",
    version="0.1.0",
    description="Hierarchical differentiable NAS for lightweight super-resolution (DLSR), "
                "with fused kernels",
    python_requires=">=3.10",
    # csrc/ ships as hdnas/csrc (data, not Python): a non-editable install builds the native
    # library from it just in time when the wheel has none (or one for another CPU)
    packages=["hdnas", "hdnas.model", "hdnas.mixed", "hdnas.infer", "hdnas.io", "hdnas.data",
              "hdnas.eval", "hdnas.nas", "hdnas.darts", "hdnas.engine", "hdnas.testing", "hdnas.kernels",
              "hdnas.csrc", "hdnas.csrc.cpu", "hdnas.csrc.cuda"],
    package_dir={"hdnas.kernels": "kernels", "hdnas.csrc": "csrc"},
    package_data={"hdnas.data": ["default/*/*.png", "default/*.md"],
                  "hdnas.csrc": ["*.h", "*.cpp"], "hdnas.csrc.cpu": ["*.h", "*.cpp"],
                  "hdnas.csrc.cuda": ["*.cuh", "*.cu", "*.cpp"]},
    # safetensors: weights that cannot run code; pypng: 16-bit colour PNG (Pillow reads 8 bits);
    # matplotlib: the run's curves and the drawing of the derived network
    install_requires=["torch>=2.3", "numpy", "pillow", "tqdm", "safetensors", "pypng",
                      "matplotlib>=3.7"],
    extras_require={
        "triton": ["triton>=3.6"],
        "export": ["onnx>=1.16", "onnxruntime>=1.18"],  # python -m hdnas.export --onnx, CPU wheels
        "tensorboard": ["tensorboard>=2.14"],  # search / train --tensorboard
        "test": ["pytest", "pytest-benchmark", "scipy", "ninja",  # scipy: independent SSIM check; ninja: native JIT build
                 "onnx>=1.16", "onnxruntime>=1.18",  # the ONNX export checked against PyTorch
                 "tensorboard>=2.14"],  # --tensorboard's event files read back
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
