"""A wheel, installed outside the checkout, serves ``--fused`` with the native backend on a CPU.

The wheel is built without the native library (``HDNAS_BUILD_NATIVE=0``), so the installed
package must build it just in time from the sources it ships (``hdnas/csrc``, package data):
that is the path a user of ``pip install .`` without ``--no-build-isolation`` (no torch at
build time) takes, and the one that broke when ``csrc/`` was not shipped. A wheel with the
library would not exercise it. It is installed into a fresh venv that sees this environment's
torch and pip (a ``.pth`` file listing this interpreter's site-packages directories: whether it
runs from a venv or not, ``--system-site-packages`` would give the base interpreter's instead)
but not the checkout, and built in a fresh ``HDNAS_CACHE_DIR``.
Slow (about 1.5 to 3 minutes on 2 cores: mostly the C++ build).
"""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

# What the installed package does, in the venv (run from a directory outside the checkout)
CHECK = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import torch
    import hdnas
    from hdnas import native_build
    from hdnas.mixed import MixedOp, get_backend, resolve_backend
    from hdnas.model.space import DLSR_PRIMITIVES

    assert Path(hdnas.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), hdnas.__file__
    # torch: the test's own (whether it runs in a venv or not), not a base interpreter's
    assert Path(torch.__file__).resolve() == Path(os.environ["OUTER_TORCH"]), torch.__file__
    assert native_build.csrc_dir() == native_build.CSRC_PACKAGED, native_build.csrc_dir()
    b = resolve_backend("fused", "cpu", torch.float32, DLSR_PRIMITIVES)
    assert b.name == "native", (b.name, native_build.error("cpu"))
    where = native_build.source("cpu")
    assert where.startswith("JIT build in " + os.environ["HDNAS_CACHE_DIR"]), where

    torch.manual_seed(0)
    m = MixedOp(4, DLSR_PRIMITIVES).double()
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(len(DLSR_PRIMITIVES), dtype=torch.float64), 0)
    outs = []
    for backend in (b, get_backend("reference")):
        y = backend.mixed_op(x, w, m)
        outs.append((y, torch.autograd.grad((y * y).sum(), x)[0]))
    for a, r in zip(*outs):
        err = ((a - r).abs().max() / r.abs().max()).item()
        assert err <= 1e-10, err
    print("native from", where)
""")


def _need_toolchain():
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++").split()[0]
    why = None
    if shutil.which(cxx) is None:
        why = f"no C++ compiler ({cxx!r})"
    elif not cpp_extension.is_ninja_available():
        why = "no ninja"
    if why is not None:
        if os.environ.get("HDNAS_REQUIRE_NATIVE") == "1":
            pytest.fail(why)
        pytest.skip(why)


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} failed:\n"
                               f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _site_dirs() -> list[str]:
    """This interpreter's site-packages directories, where torch and pip are: a venv's own (and
    the base's when the venv has --system-site-packages), and the user's when it uses them."""
    paths = sysconfig.get_paths()
    dirs = [paths["purelib"], paths["platlib"], *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(os.path.realpath(d) for d in dirs) if os.path.isdir(d)]


def _see_this_environment(py: Path) -> None:
    """A .pth file in the venv ``py`` adds this interpreter's site-packages directories to its
    path, after the venv's own. Their own .pth files are not run (the editable install's path
    hook stays out), so the venv's hdnas is the wheel's."""
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                             check=True).stdout.strip()
    Path(purelib).mkdir(parents=True, exist_ok=True)
    (Path(purelib) / "outer_environment.pth").write_text("\n".join(_site_dirs()) + "\n")


@pytest.mark.slow
def test_wheel_builds_native_just_in_time(tmp_path):
    _need_toolchain()
    # a clean copy of what setup.py packages (pip builds in the source tree: no build/ or
    # egg-info in the checkout, and no prebuilt library can slip into the wheel)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("hdnas", "kernels", "csrc"):
        shutil.copytree(ROOT / name, src / name,
                        ignore=shutil.ignore_patterns("*.so", "*.o", "__pycache__"))
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "HDNAS_BUILD_NATIVE", "HDNAS_CACHE_DIR")}
    env["PYTHONNOUSERSITE"] = "1"

    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
          "--no-cache-dir", "-w", str(wheels), str(src)],
         cwd=tmp_path, env={**env, "HDNAS_BUILD_NATIVE": "0"})
    (wheel,) = wheels.glob("hdnas-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _see_this_environment(py)
    # the venv sees this environment's pip and torch; --ignore-installed: the editable hdnas
    # there is not uninstalled, the venv gets its own copy, which comes first on its path
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed",
          "--no-cache-dir", str(wheel)], cwd=tmp_path, env=env)

    work = tmp_path / "run"
    work.mkdir()
    r = _run([str(py), "-c", CHECK], cwd=work,
             env={**env, "HDNAS_CACHE_DIR": str(tmp_path / "cache"),
                  "OUTER_TORCH": str(Path(torch.__file__).resolve())})
    assert "native from JIT build in" in r.stdout, r.stdout
