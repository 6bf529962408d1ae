"""Packaging of the prebuilt op library (see build_pip_pkg.sh)."""
from setuptools import Distribution, find_packages, setup


class BinaryDistribution(Distribution):
    """The wheel carries a compiled library: tag it for this platform, never 'any'."""

    def has_ext_modules(self):
        return True


setup(
    name="tf-layernorm",
    version="0.1.0",
    description="Fused Layer Normalization op and Keras layer for TensorFlow",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["tf_layernorm", "tf_layernorm.*"]),
    package_data={"tf_layernorm": ["*.so", "_build_info.json"]},
    include_package_data=True,
    python_requires=">=3.9",
    # No dependency on "tensorflow": it would pull the full wheel next to
    # tensorflow-cpu. The import checks the running TF's major.minor instead.
    install_requires=["numpy"],
    extras_require={"test": ["pytest", "torch"]},
    distclass=BinaryDistribution,
    zip_safe=False,
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
