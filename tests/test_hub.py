"""Hugging Face hub ids as checkpoints: resolution through an offline hub cache the test builds, local paths first,
one-line errors for offline / not found / gated / bad ids. Nothing here reaches the network (offline_env)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import m2f
from m2f.checkpoints import hf as hf_checkpoints
from m2f.checkpoints import resolve_checkpoint
from m2f.errors import CheckpointError
from tests.utils import fresh_seed, hub_cache_snapshot, offline_env

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

REPO = "tiny-org/mask2former-tiny"
NUM_LABELS = 3


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """A hub cache holding REPO at main and at tag v1: a tiny random HF Mask2Former saved by transformers."""
    seed = fresh_seed("hub_model")
    torch.manual_seed(seed)
    config = transformers.Mask2FormerConfig(
        backbone_config=transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1],
                                                  layer_type="bottleneck",
                                                  out_features=["stage1", "stage2", "stage3", "stage4"]),
        feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1, encoder_feedforward_dim=32,
        num_attention_heads=4, decoder_layers=2, num_queries=5, dim_feedforward=32,
        id2label={i: f"thing{i}" for i in range(NUM_LABELS)},
    )
    model = transformers.Mask2FormerForUniversalSegmentation(config).eval()
    home = tmp_path_factory.mktemp("hf_home")
    model.save_pretrained(hub_cache_snapshot(home, REPO))
    shutil.copytree(next((home / "hub").glob("*/snapshots/*")),
                    hub_cache_snapshot(home, REPO, revision="v1"), dirs_exist_ok=True)
    return home


def m2f_cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "m2f", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("spec", [REPO, f"hf://{REPO}", f"{REPO}@v1"])
def test_hub_id_through_offline_cache(spec, hf_home, tmp_path):
    run = m2f_cli(["convert", spec, "--output", "out"], offline_env(hf_home), tmp_path)
    assert run.returncode == 0, run.stderr
    model = m2f.from_pretrained(tmp_path / "out")
    assert model.config.class_names == tuple(f"thing{i}" for i in range(NUM_LABELS))
    assert model.config.name == f"hf:{spec.removeprefix('hf://')}"


def test_local_path_wins_over_hub_id(hf_home, tmp_path):
    # a local m2f checkpoint spelled like the hub id (the shipped default model: 2 classes, not NUM_LABELS)
    from m2f.assets import default_checkpoint_path

    shutil.copytree(default_checkpoint_path(), tmp_path / REPO)
    run = m2f_cli(["convert", REPO, "--output", "out"], offline_env(hf_home), tmp_path)
    assert run.returncode == 0, run.stderr
    assert m2f.from_pretrained(tmp_path / "out").config == m2f.from_pretrained(default_checkpoint_path()).config


def test_offline_and_not_cached_is_one_line(hf_home, tmp_path):
    run = m2f_cli(["convert", "someone/not-cached", "--output", "out"], offline_env(hf_home), tmp_path)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert "someone/not-cached is not in the Hugging Face cache" in lines[0]
    assert "HF_HUB_OFFLINE is set" in lines[0] and "pass a local directory" in lines[0]
    assert not (tmp_path / "out").exists()


def test_export_onnx_takes_a_hub_id(hf_home, tmp_path):
    run = m2f_cli(["export", "onnx", "--checkpoint", REPO, "--output", "tiny.onnx", "--height", "64", "--width", "64"],
                  offline_env(hf_home), tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "tiny.onnx").is_file()


def _hub_error(cls, message="404 Client Error"):
    # huggingface_hub's HTTP errors carry the server's response; the message alone is what m2f reads
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    return err


@pytest.mark.parametrize("error, spec, expected", [
    ("RepositoryNotFoundError", "nobody/nothing", r"nobody/nothing is neither a local path nor a model on the Hugging "
                                                  r"Face hub .*check the spelling, or pass a local directory"),
    ("GatedRepoError", "meta/gated", r"meta/gated is a gated model on the Hugging Face hub: accept its terms on "
                                     r"https://huggingface.co/meta/gated and log in"),
    ("RevisionNotFoundError", "owner/name@nope", r"owner/name has no revision 'nope' on the Hugging Face hub"),
    ("HFValidationError", "owner/name@a..b", r"'owner/name@a..b' is not a valid Hugging Face model id"),
    ("LocalEntryNotFoundError", "owner/name", r"owner/name is not in the Hugging Face cache .* pass a local directory"),
])
def test_hub_failures_are_one_line(error, spec, expected, monkeypatch, tmp_path):
    cls = getattr(huggingface_hub.errors, error)

    def refuse(*args, **kwargs):
        raise _hub_error(cls) if issubclass(cls, huggingface_hub.errors.HfHubHTTPError) else cls("refused")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=expected) as info:
        m2f.from_pretrained(spec)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec, hub", [
    ("owner/name", ("owner/name", None)), ("hf://owner/name@v1.0", ("owner/name", "v1.0")),
    ("owner/name@0123abc", ("owner/name", "0123abc")), ("./owner/name", None), ("a/b/c", None), ("/abs/x", None),
    ("owner/name/", None), ("model_final.pkl", None),
])
def test_what_reads_as_a_hub_id(spec, hub):
    assert hf_checkpoints.parse_hub_id(spec) == hub


def test_bad_hf_scheme_and_missing_local_path(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"'hf://nope' is not a Hugging Face model id; write hf://OWNER/NAME"):
        resolve_checkpoint("hf://nope")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"model_final.pkl does not exist; pass a Hugging Face Mask2Former "
                                              r"directory or hub id \(OWNER/NAME\)"):
        resolve_checkpoint("model_final.pkl")
