from setuptools import setup

setup(
    name="torch_clip_fused",
    version="0.1.0",
    description="Clipped SGD for heavy-tailed gradients: fused Triton (GPU) and C++ (CPU) kernels, "
    "with a pure-PyTorch reference",
    packages=[
        "torch_clip_fused",
        "torch_clip_fused.backends",
        "torch_clip_fused.backends.cpp",
        "torch_clip_fused.backends.reference",
        "torch_clip_fused.backends.triton",
        "torch_clip_fused.distributed",
        "torch_clip_fused.experiments",
        "torch_clip_fused.integrations",
        "torch_clip_fused.kernels",
        "torch_clip_fused.optim",
        "torch_clip_fused.csrc",
    ],
    package_dir={"torch_clip_fused.kernels": "kernels", "torch_clip_fused.csrc": "csrc"},
    package_data={"torch_clip_fused.csrc": ["*.cpp", "*.h"]},
    python_requires=">=3.9",
    # torch >= 2.11: the oldest torch the code has run on (the GPU machine's 2.11; CI pins 2.13)
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton"],
        "cpp": ["ninja"],
        "experiments": ["matplotlib", "tqdm", "scikit-learn"],
        "dev": ["pytest", "ninja", "matplotlib", "tqdm", "scikit-learn", "torch-clip==0.0.6", "zclip==1.0.0",
                "pytorch-optimizer==4.1.0"],
    },
)
