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
        # for the tests' shape and tree assertions; pytest-xdist for the two workers of pytest.ini.
        "test": ["torch==2.13.0", "accelerate>=1.0", "pytest>=8", "pytest-xdist>=3.5,<4", "chex>=0.1.90,<0.2",
                 # the tutorial notebook, executed by tests/test_readme.py
                 "nbclient>=0.10,<0.12", "nbformat>=5.10,<6", "ipykernel>=6.29,<8"],
        # The peers of benchmarks/sweep_vs_peers.py. transformer-lens 3.9.0 is the last release with
        # HookedTransformer (it also ships TransformerBridge); 4.x is the same distribution. nnsight
        # 0.8.1 wraps the HF model. Both accept transformers 5.24 and torch 2.13 CPU, so they install
        # beside the test extras without changing jax, flax, transformers or torch.
        # auto-circuit 1.0.1 (benchmarks/edges_vs_autocircuit.py, tests/test_edge_attribution.py) is not
        # listed: its declared deps pull tracr-pypi (jax/haiku), kaleido, word2word and vscode-tqdm (a tqdm
        # fork). Install it with `pip install --no-deps auto-circuit==1.0.1`; the packages below are all
        # that its imports used there need.
        # sae-lens 6.54.12 (tests/test_dictionary_files.py's reference encode/decode and file round trip,
        # the SAE benchmarks) resolves to transformer-lens 3.9.0, transformers 5.24 and torch 2.13 CPU too.
        # circuit-tracer 0.5.0 (benchmarks/graph_vs_circuit_tracer.py, the live variant of
        # tests/test_graph_circuit_tracer.py) is not listed: it pins transformers >=4.56,<=4.57.3, so it
        # cannot install beside transformers 5.24. It lives in its own venv, run by subprocess:
        #   python3 -m venv /tmp/ctvenv
        #   /tmp/ctvenv/bin/pip install torch==2.13.0          # the CPU wheel
        #   /tmp/ctvenv/bin/pip install circuit-tracer==0.5.0
        "bench": ["torch==2.13.0", "transformer-lens==3.9.0", "nnsight==0.8.1", "sae-lens==6.54.12",
                  "einops>=0.6.1", "ordered-set>=4.1.0", "plotly>=5.18.0", "attrs", "blobfile>=2.0.2"],
    },
)
