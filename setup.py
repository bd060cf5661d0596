from setuptools import find_packages, setup

# Ranges, not pins: a library installs into environments that already hold torch and friends. Each lower
# bound is the oldest version the whole suite has passed with (today: the versions in constraints.txt,
# which .ci/install applies; lower a bound only after the suite passes on that version). No upper
# bounds: no next major is known to break us.
# PyTorch's ONNX exporter needs onnxscript; onnxruntime runs and checks the exported graph.
EXPORT = ["onnx>=1.23", "onnxscript>=0.7", "onnxruntime>=1.32"]

setup(
    name="mugcp",
    version="0.1.0",
    description="Fast prompt learning for frozen CLIP models: MuGCP and its baselines, with fused Triton kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The top-level configs/ folder (where configs are edited) ships inside the package as mugcp/configs.
    packages=[*find_packages(include=["mugcp", "mugcp.*"]), "mugcp.configs"],
    package_dir={"mugcp.configs": "configs"},
    package_data={"mugcp.configs": ["*.yaml", "**/*.yaml"]},
    install_requires=[
        "torch>=2.14",
        "torchvision>=0.29",
        "triton>=3.8; platform_system == 'Linux'",
        "open_clip_torch>=3.3",
        "transformers>=5.25",
        "safetensors>=0.8",
        "tqdm>=4.70",
        "tensorboard>=2.21",
        "matplotlib>=3.11",
        "PyYAML>=6.0.4",
        "numpy>=2.4",
        "Pillow>=13",
    ],
    extras_require={
        "dev": ["pytest>=9.2", "pytest-benchmark>=5.3", "submitit>=1.5.4", "ruff>=0.17", *EXPORT],
        "gpu": ["flash-attn", "xformers"],
        "slurm": ["submitit>=1.5.4"],
        "export": EXPORT,
    },
)
