"""lgp_ds: Layer Grafted Pre-training of Vision Transformers on DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="lgp_ds",
    version="0.1.0",
    description="Layer Grafted Pre-training (MIM -> contrastive) of ViTs at scale with DeepSpeed",
    python_requires=">=3.10",
    packages=find_packages(include=["lgp_ds", "lgp_ds.*"]),
    package_data={"lgp_ds": ["recipes/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.16",
        "timm>=1.0",
        "webdataset>=0.2.90",
        "fvcore",
        "pyyaml",
        "pydantic>=2",
        "scikit-learn",
        "matplotlib",  # the comparison's bar chart
        "pillow",
        "tqdm",  # tools/make_shards.py's progress bar
        "numpy",
    ],
    extras_require={
        # input_backend: dali. The wheel for CUDA 12; with CUDA 13 install nvidia-dali-cuda130.
        "dali": ["nvidia-dali-cuda120"],
        # with DALI, so that CI runs its CPU pipeline (tests/test_dali.py) for real
        "test": ["pytest>=7", "nvidia-dali-cuda120"],
    },
)
