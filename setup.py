"""m2f: optimized Mask2Former deployment toolkit.

The repository keeps the design card's layout (kernels/, m2f/, export/, bench/ at the root) while the
installed package is one import namespace: ``m2f``, ``m2f.kernels``, ``m2f.export``, ``m2f.bench``.
"""
from setuptools import find_namespace_packages, find_packages, setup

# Top-level source folders and the import name each one is installed as.
_ROOTS = {"m2f": "m2f", "kernels": "m2f.kernels", "export": "m2f.export", "bench": "m2f.bench"}

packages, package_dir = [], {}
for folder, name in _ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# Data-only folders (the default model, the sample images) are packages too, so that setuptools installs them
# without its "package absent from the packages configuration" banner on every install.
_DATA_PACKAGES = [f"m2f.assets.{sub}" for sub in find_namespace_packages("m2f/assets", exclude=["*__pycache__*"])]
for name in _DATA_PACKAGES:
    packages.append(name)
    package_dir[name] = name.replace(".", "/")

setup(
    name="m2f",
    version="0.1.0",
    description="Mask2Former, fast: fused Triton kernels, verified ONNX / TensorRT export, one CLI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={name: ["*"] for name in _DATA_PACKAGES},
    install_requires=[
        # Exact pin: a CPU build of this version is what CI and the dev machines have on disk; a looser
        # spec lets pip replace it with a multi-GB CUDA build. Never add torchvision or timm.
        "torch==2.13.0",
        # Triton runs only on Linux (CUDA); elsewhere m2f uses its PyTorch kernels and still exports ONNX.
        "triton>=3.6; platform_system == 'Linux'",
        "huggingface_hub>=0.23",  # hub ids as --checkpoint (owner/name)
        "numpy>=1.26",
        "safetensors>=0.4",
        "scipy>=1.11",
        "pillow>=10",
        "tqdm>=4.66",
        "rich>=13",
        "matplotlib>=3.8",
        "pycocotools>=2.0.7",
    ],
    extras_require={
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnxslim>=0.1.40",
                 "onnxconverter-common>=1.14"],
        "tensorrt": ["tensorrt>=10.3", "cuda-python>=12.6"],
        "openvino": ["openvino>=2024.4"],
        "serve": ["ray[serve]>=2.40", "python-multipart>=0.0.9"],  # multipart: starlette's form parser
        "video": ["av>=12"],  # `m2f predict clip.mp4`
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "pytest-timeout>=2.3",
            "transformers>=4.45",
            "onnx>=1.16",
            "onnxruntime>=1.18",
            "onnxscript>=0.2",
            "onnxslim>=0.1.40",
            "openvino>=2024.4",
            "nncf>=3.4",  # `m2f export openvino --precision int8` (pulls no torch: checked with pip --dry-run)
            "ray[serve]>=2.40",
            "python-multipart>=0.0.9",
            "av>=12",
            "onnxconverter-common>=1.14",
            # type-checks export/'s TensorRT modules against tensorrt-stubs; the stubs pin the tensorrt runtime
            # itself (not installable without a GPU stack), so `make install-test` adds them with --no-deps
            "mypy>=1.10",
            "ruff>=0.5",  # tests/test_lint.py: pyflakes' rules over the tree
        ],
    },
    entry_points={"console_scripts": ["m2f=m2f.cli:main"]},
)
