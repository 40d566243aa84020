"""Shardforge: raw text to a trained, evaluated, deployable language model on a Slurm cluster."""

from setuptools import find_packages, setup

setup(
    name="shardforge",
    version="0.1.0",
    description="Data, training, checkpoints, evaluation and export for GPT-style models on Slurm",
    python_requires=">=3.10",
    packages=find_packages(include=["core*", "data_pipeline*", "parallelism*", "training*", "launcher*", "slurm*"]),
    package_data={"parallelism": ["devices.json"], "slurm": ["*.sbatch", "*.sh"]},
    install_requires=[
        # compatible ranges; the exact tested versions live in constraints.txt
        "torch>=2.4,<3",
        "megatron-core>=0.16,<0.17",
        "deepspeed>=0.16,<0.20",
        "webdataset>=0.2.100,<2",
        "sentencepiece>=0.2,<0.3",
        "tensorboard>=2.15,<3",
        "pydantic>=2.6,<3",
        "PyYAML>=6,<7",
        "tqdm>=4.60,<5",
        "psutil>=5.9",
        "datasketch>=1.6,<3",
        "xxhash>=3",
        "pyarrow>=14",
        "zstandard>=0.22",
        "numpy>=1.26",
        "safetensors>=0.4",
    ],
    extras_require={
        "test": ["pytest>=8,<9", "pytest-timeout>=2.3", "pytest-xdist>=3.5"],  # xdist groups: pytest 8 (conftest)
        "hf": ["transformers>=4.45"],
        "harness": ["lm-eval>=0.4.5,<0.5"],
    },
    entry_points={"console_scripts": ["shardforge=launcher.cli:main"]},
)
