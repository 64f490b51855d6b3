from pathlib import Path

from setuptools import find_packages, setup


def read_requirements():
    lines = Path(__file__).with_name("requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="megatron-r1",
    version="0.1.0",
    description="Pre-train, fine-tune and export DeepSeek-R1/V3-style MoE models on megatron-core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_r1", "megatron_r1.*"]),
    package_data={"megatron_r1": ["assets/*"]},
    install_requires=read_requirements(),
    extras_require={
        # GPU-only accelerations; everything falls back to megatron-core's local implementations without them.
        # Only what pip can really install: PyPI's "apex" is an unrelated package (NVIDIA Apex builds
        # from its repository, see README), and flash-attn compiles against the installed torch.
        "gpu": ["transformer-engine[pytorch]"],
        # The suite runs on transformers 4.57.6; tests/hf/test_transformers_versions.py checks 5.x.
        "dev": ["pytest", "datasketch", "hypothesis", "ruff==0.17.6", "transformers==4.57.6"],
    },
)
