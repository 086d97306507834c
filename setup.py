"""AutoThink: teach R1-style reasoning models when to think (multi-stage RL, ZeRO-3, SGLang)."""
from setuptools import find_packages, setup

setup(
    name="autothink",
    version="0.1.0",
    description="Adaptive-thinking RL for R1-style reasoning models (the AutoThink method)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["at_core*", "at_rollout*", "at_reward*"]),
    package_data={"at_core": ["../csrc/*.cpp", "../csrc/*.cu", "../csrc/*.h"]},
    include_package_data=True,
    install_requires=[
        # Satisfied by the local CPU build 2.13.0 (install it first) and by CUDA builds alike.
        "torch>=2.4",
        "deepspeed>=0.16",
        # Tested on 5.24. The generator passes the KV cache by whichever name forward() takes
        # (`cache` in 5.x; `past_key_values`, which 5.40 removes, before); 6 may rename more.
        "transformers>=4.51,<6",
        "accelerate>=1.1",  # transformers needs it for its ZeRO-3 loading path
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "tensorboard>=2.15",
        "math-verify>=0.7",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "pyarrow>=15",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httptools>=0.6",  # uvicorn picks it up: half the HTTP time of the pure-Python parser
        "requests>=2.31",
        "pybase64>=1.3",  # SIMD base64 for weight sync request bodies
        "ninja>=1.11",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.3"],
        # The releases tests/test_sglang_contract.py checks the client against (at_rollout/backends/sglang.py).
        "sglang": ["sglang[all]>=0.5.15.post1,<=0.5.23"],
        "gpu": ["flash-attn>=2.6", "liger-kernel>=0.5"],
        # benchmarks/vs_trl.py only (TRL's GRPOTrainer as the peer); never imported by the package.
        "bench": ["trl==1.16.0"],
    },
    entry_points={
        "console_scripts": [
            "autothink-eval=at_core.eval:main",
            "autothink-plan=at_core.plan:main",
            "autothink-server=at_rollout.server:main",
        ]
    },
)
