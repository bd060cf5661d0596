from setuptools import find_packages, setup

setup(
    name="mugcp",
    version="0.1.0",
    description="Fast prompt learning for frozen CLIP models: MuGCP and its baselines, with fused Triton kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mugcp", "mugcp.*", "kernels", "kernels.*"]),
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "triton",
        "open_clip_torch>=2.24",
        "transformers>=4.45",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "PyYAML>=6.0",
        "numpy",
        "Pillow",
    ],
    extras_require={
        "dev": ["pytest>=7", "pytest-benchmark>=4", "submitit>=1.5"],
        "gpu": ["flash-attn", "xformers"],
        "slurm": ["submitit>=1.5"],
    },
)
