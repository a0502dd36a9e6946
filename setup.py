"""Packaging for t2i-distill: the `t2i_kernels` (Triton ops) and `t2i_distill` (FLUX integration, CLI) packages."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

# torch: a range that the CPU wheel on the CI disk (2.13.0) and the GPU image (2.11) both satisfy, with an upper
# bound so that pip never replaces an installed torch with a newer (multi-GB CUDA) build. Install torch first
# (`scripts/setup_env.sh` does): an installed torch in range is always kept.
INSTALL_REQUIRES = [
    "torch>=2.11,<2.14",
    # triton: 3.6 (the GPU image's) to 3.9 (CI's) are the versions the compile report and the tests cover; a new
    # Triton release has removed language features before (make_block_ptr in 3.9), so the next one is not assumed.
    "triton>=3.6,<3.10; platform_system == 'Linux'",
    "numpy>=1.24",
    "diffusers>=0.42,<0.43",
    "transformers>=4.51",
    "accelerate>=1.0",
    "datasets>=3.0",
    "safetensors>=0.4",
    "tqdm>=4.66",
    "pyyaml>=6.0",  # trainer --config files
    "tensorboard>=2.14",  # the trainer's default tracker (--report_to tensorboard)
]

EXTRAS_REQUIRE = {
    # kernels: Hugging Face's hub-kernels loader (import name `kernels`, which transformers >= 5.25 requires);
    # tests/test_coexistence.py proves our layer (`t2i_kernels`) and diffusers' FLUX work beside it.
    "dev": ["pytest>=8.0", "pytest-xdist>=3.5", "pytest-benchmark>=5.0", "ruff>=0.6", "matplotlib>=3.8", "peft>=0.13",
            "kernels>=0.19"],
    # lora: LoRA students (train --lora_rank); `dev` has peft too, so constraints.txt pins it (scripts/lock.sh).
    "lora": ["peft>=0.13"],
    "wandb": ["wandb>=0.17"],
    "prodigy": ["prodigyopt>=1.0"],
    "bench": ["pytest-benchmark>=5.0", "matplotlib>=3.8"],
    "deepspeed": ["deepspeed>=0.17"],
    # flash-attn builds against CUDA; it is optional everywhere and never required.
    "flash": ["flash-attn>=2.6"],
}

setup(
    name="t2i-distill",
    version="0.1.0",
    description="Few-step sCM/MeanFlow distillation of FLUX with fused Triton JVP kernels",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # diffusers 0.42 requires Python >= 3.11
    # The two top-level packages and their subpackages (t2i_distill.models, ...).
    packages=find_packages(include=["t2i_kernels", "t2i_kernels.*", "t2i_distill", "t2i_distill.*"]),
    # The demo's shipped tiny teacher (a diffusers pipeline folder: configs, tokenizers, safetensors weights).
    package_data={"t2i_distill.demo": ["teacher/*.json", "teacher/*.png", "teacher/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["t2i-distill=t2i_distill.cli:main"]},
)
