import pathlib

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
requirements = [l.strip() for l in (here / "requirements.txt").read_text().splitlines()
                if l.strip() and not l.startswith("#")]

setup(
    name="jaxcircuits",
    version="0.1.0",
    description="Mechanistic-interpretability sweeps over attention-head subsets in JAX",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["jaxcircuits", "jaxcircuits.*", "experiments", "benchmarks"]),
    install_requires=requirements,
    extras_require={
        # The reference implementation in tests: HF transformers on CPU torch (install the local
        # CPU wheel first: `pip install torch==2.13.0`), plus accelerate for HF's GGUF loader; chex
        # for the tests' shape and tree assertions.
        "test": ["torch==2.13.0", "accelerate>=1.0", "pytest>=8", "chex>=0.1.90,<0.2"],
        # The peers of benchmarks/sweep_vs_peers.py. transformer-lens 3.9.0 is the last release with
        # HookedTransformer (it also ships TransformerBridge); its pins accept transformers 5.23 and
        # torch 2.13 CPU, so it installs beside the test extras. 4.x is the same distribution.
        "bench": ["torch==2.13.0", "transformer-lens==3.9.0"],
    },
)
