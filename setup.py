"""hdnas packaging. ``kernels/`` installs as ``hdnas.kernels`` (the top-level name ``kernels`` is
taken on PyPI). torch is required but never pinned here, so a GPU user's own torch is kept and
a CPU machine is not made to download a CUDA build: install torch first (see README)."""
from setuptools import setup

setup(
    name="hdnas",
    version="0.1.0",
    description="Hierarchical differentiable NAS for lightweight super-resolution (DLSR), "
                "with fused kernels",
    python_requires=">=3.10",
    packages=["hdnas", "hdnas.mixed", "hdnas.data", "hdnas.kernels"],
    package_dir={"hdnas.kernels": "kernels"},
    package_data={"hdnas.data": ["default/*/*.png", "default/*.md"]},
    install_requires=["torch>=2.3", "numpy", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "pytest-benchmark"],
    },
)
