"""fastres: fused conv+BN+ReLU and residual kernels for ResNets, in Triton."""
from setuptools import setup

setup(
    name="fastres",
    version="0.1.0",
    description=("Fused Triton kernels for ResNet inference and training: conv+BN+ReLU, "
                 "residual add, drop-in modules"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but install as fastres.kernels,
    # so that fastres never claims the generic top-level import name "kernels".
    # benchmarks/ (bench, gate and their suites) is not installed: those tools need a checkout.
    packages=["fastres", "fastres.kernels", "fastres.launch", "fastres.ops", "fastres.nn",
              "fastres.tools"],
    package_dir={"fastres": "fastres", "fastres.kernels": "kernels"},
    package_data={"fastres.launch": ["*.json"]},
    # Supported stack: both ends are in use (CPU CI: torch 2.14 + triton 3.8; H100 check
    # machine: torch 2.11 + triton 3.6).
    install_requires=["torch>=2.11,<2.15", "triton>=3.6,<3.9"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "torchvision", "timm", "matplotlib"],
        "bench": ["pytest", "pytest-benchmark", "torchvision", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastres=fastres.tools.cli:main"]},
)
