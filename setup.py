"""fairseq-qasr: honest low-bit quantization of transformer speech recognizers (a Fairseq plugin)."""
from setuptools import find_packages, setup

setup(
    name="fairseq-qasr",
    version="0.1.0",
    description="Honest low-bit quantization of transformer ASR models, as a Fairseq --user-dir plugin",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["fairseq_qasr", "fairseq_qasr.*"]),
    include_package_data=True,
    package_data={"fairseq_qasr.integer": ["csrc/*.c"]},  # the AVX2 kernels, compiled on first use
    install_requires=[
        "torch>=2.6",
        "torchaudio>=2.6",
        "ve-fairseq>=0.12.3",
        "sentencepiece>=0.2",
        "soundfile>=0.12",
        "omegaconf>=2.1",
        "PyYAML",
        "editdistance",
        "jiwer",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "hypothesis"]},
)
