"""Models from the Hugging Face Hub: `jc.load('org/name')` and the binaries' --model download what
they read through huggingface_hub, here from a real HTTP server on 127.0.0.1 in the Hub's URL layout
(tests/hub_server.py), never the real Hub: offline use of the cache, resuming, one-line errors."""

import os
import socket

import jax.numpy as jnp
import numpy as np
import pytest

import jaxcircuits as jc
from jaxcircuits import logs
from jaxcircuits.weights import registry
from tests.conftest import run_binary
from tests.hub_server import GRANTED, FakeHub, repo_from_dir

WORDS = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "."]


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A saved random tiny Llama (sharded: an index and its shards) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    path = tmp_path_factory.mktemp("tiny_hub_model")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=16, max_position_embeddings=32, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="4KB")
    return str(path)


@pytest.fixture
def hub(tiny_repo, tmp_path, monkeypatch):
    """The stand-in Hub serving org/tiny (plus files jaxcircuits must not fetch), the gated org/gated
    and the private org/private, with HF_ENDPOINT, the caches and online mode set for this test."""
    from huggingface_hub import constants
    files = {**repo_from_dir(tiny_repo), "pytorch_model.bin": b"\0" * 4096, "onnx/model.onnx": b"\0" * 64,
             "README.md": b"# tiny\n"}
    server = FakeHub({"org/tiny": files, "org/gated": files, "org/private": files}, gated={"org/gated"},
                     private={"org/private"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("JAXCIRCUITS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no_login"))      # not logged in
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))                         # the cache: $HF_HOME/hub
    yield server
    server.close()


def _logits(model):
    return np.asarray(model.run_with_cache("the cat sat on a mat", sites=())[0])


def test_download_loads_as_the_saved_dir_then_works_offline(hub, tiny_repo, monkeypatch):
    model = jc.load("org/tiny")
    np.testing.assert_array_equal(_logits(model), _logits(jc.load(tiny_repo)))
    assert model.files.name == "org/tiny" and model.files.path.startswith(os.path.join(os.environ["HF_HOME"], "hub"))
    shards = [f for f in os.listdir(tiny_repo) if f.startswith("model-")]
    assert len(shards) > 1
    assert sorted(hub.downloads("org/tiny")) == sorted(["config.json", "model.safetensors.index.json", *shards,
                                                        "tokenizer.json", "tokenizer_config.json"])
    hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    np.testing.assert_array_equal(_logits(jc.load("org/tiny")), _logits(model))
    assert hub.requests == []                                   # the cache alone


def test_a_file_cut_off_resumes_and_a_rerun_fetches_only_what_is_missing(hub, tiny_repo, monkeypatch):
    """huggingface_hub resumes from the last whole chunk it received (10 MB; 256 bytes here) with an
    HTTP Range request; files it finished stay in the cache when a download stops."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256)
    shard = sorted(f for f in os.listdir(tiny_repo) if f.startswith("model-"))[0]
    hub.cut_once.add(shard)
    path = registry.resolve("org/tiny").path
    ranges = [r for m, p, r in hub.requests if m == "GET" and p.endswith("/" + shard)]
    assert ranges == [None, "bytes=%d-" % (os.path.getsize(os.path.join(tiny_repo, shard)) // 2 // 256 * 256)]
    assert open(os.path.join(path, shard), "rb").read() == open(os.path.join(tiny_repo, shard), "rb").read()
    os.remove(os.path.realpath(os.path.join(path, shard)))      # the blob, as if never finished
    os.remove(os.path.join(path, shard))
    hub.requests.clear()
    assert registry.resolve("org/tiny").path == path
    assert hub.downloads("org/tiny") == [shard]


def test_an_alias_downloads_its_first_id(hub, monkeypatch):
    monkeypatch.setitem(registry.ALIASES, "tiny", ("org/tiny", "org/other"))
    assert registry.resolve("TINY").name == "org/tiny"


def test_a_gated_model_downloads_with_a_token(hub, monkeypatch):
    """huggingface_hub sends HF_TOKEN (or `hf auth login`'s) with every request."""
    monkeypatch.setenv("HF_TOKEN", GRANTED)
    assert registry.resolve("org/gated").path.startswith(os.path.join(os.environ["HF_HOME"], "hub"))


def test_progress_off_silences_the_hub_bars():
    logs.set_progress(False)
    try:
        assert logs.hub_tqdm_class()(total=3).disable
    finally:
        logs.set_progress(True)
    assert logs.hub_tqdm_class() is None                        # huggingface_hub's own bars


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["gated", "private", "missing", "no_network", "offline"])
def test_errors_are_one_line(hub, monkeypatch, case):
    name, error, message = {
        "gated": ("org/gated", PermissionError, f"HF model 'org/gated' on {hub.url} is gated or private: accept "
                  "its licence on the Hub and log in (HF_TOKEN or `hf auth login`)"),
        "private": ("org/private", PermissionError, f"HF model 'org/private' on {hub.url} does not exist, or is "
                    "gated or private (401): check the name; to read a gated or private model accept its licence "
                    "on the Hub and log in (HF_TOKEN or `hf auth login`)"),
        "missing": ("org/nope", FileNotFoundError, f"HF model 'org/nope' does not exist on {hub.url} (404)"),
        "no_network": ("org/tiny", ConnectionError, "cannot reach http://127.0.0.1:{port} to download HF model "
                       "'org/tiny': no network? set HF_HUB_OFFLINE=1 to use the cache only, or pass a local directory"),
        "offline": ("org/tiny", FileNotFoundError, "HF model 'org/tiny' is not in the local HF hub cache "
                    f"{os.environ['HF_HOME']}/hub and HF_HUB_OFFLINE=1 is set"),
    }[case]
    if case == "no_network":
        port = _closed_port()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
        message = message.format(port=port)
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(error) as e:
        jc.load(name, jnp.float32)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    if case == "offline":
        assert hub.requests == []


def test_a_binary_on_a_gated_model_ends_in_one_line(hub, tmp_path, monkeypatch):
    """... and JAXCIRCUITS_PROGRESS=0 turns off huggingface_hub's bars too (otherwise 'Fetching 4 files')."""
    monkeypatch.setenv("JAXCIRCUITS_PROGRESS", "0")
    r = run_binary("experiments.threshold_sweep", "--model=org/gated", f"--out={tmp_path / 'out'}")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"threshold_sweep: error: HF model 'org/gated' on {hub.url} is gated or private: accept its licence on "
        "the Hub and log in (HF_TOKEN or `hf auth login`)"], r.stderr[-2000:]
