"""m2f: optimized Mask2Former deployment toolkit.

The repository keeps the design card's layout (kernels/, m2f/, export/, bench/ at the root) while the
installed package is one import namespace: ``m2f``, ``m2f.kernels``, ``m2f.export``, ``m2f.bench``.
"""
from setuptools import find_packages, setup

# Top-level source folders and the import name each one is installed as.
_ROOTS = {"m2f": "m2f", "kernels": "m2f.kernels", "export": "m2f.export", "bench": "m2f.bench"}

packages, package_dir = [], {}
for folder, name in _ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(
    name="m2f",
    version="0.1.0",
    description="Mask2Former, fast: fused Triton kernels, verified ONNX / TensorRT export, one CLI",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"m2f": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        # Exact pin: a CPU build of this version is what CI and the dev machines have on disk; a looser
        # spec lets pip replace it with a multi-GB CUDA build. Never add torchvision or timm.
        "torch==2.13.0",
        "triton>=3.6",
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
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2", "onnxslim>=0.1.40"],
        "tensorrt": ["tensorrt>=10.7", "cuda-python>=12.6"],
        "openvino": ["openvino>=2024.4"],
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
        ],
    },
    entry_points={"console_scripts": ["m2f=m2f.cli:main"]},
)
