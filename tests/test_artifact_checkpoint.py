"""The dbllm checkpoint (model.safetensors + dbllm.json): round trip in a fresh process, no
pickle, clear errors for damaged files, atomic save."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.artifact import artifact_info, load_deployed, read_checkpoint, save_deployed
from dbllm_compile.artifact.format import ARTIFACT_VERSION, MANIFEST_FILE, WEIGHTS_FILE
from dbllm_compile.errors import ArtifactError


def _deploy(model: torch.nn.Module, example: torch.Tensor, **kwargs) -> dc.DBLLMModel:
    q = dc.quantize(model, (example,), dc.DBLLMConfig(**kwargs), example_kwargs={"use_cache": False}
                    if hasattr(model, "config") else None, progress=False)
    return dc.convert(q, progress=False)


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory):
    """A tiny random Llama, deployed and saved; plus inputs and logits to compare against."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    deployed = _deploy(LlamaForCausalLM(cfg).eval(), torch.randint(0, 128, (2, 16)))
    root = tmp_path_factory.mktemp("llama_artifact")
    path = save_deployed(deployed, root / "art")
    ids = torch.randint(0, 128, (3, 11))  # other batch and sequence than the export example
    from safetensors.torch import save_file

    save_file({"ids": ids, "logits": deployed(ids).logits}, str(root / "reference.safetensors"))
    return path, deployed, root / "reference.safetensors"


def _run_fresh(script: str, *args: str, timeout: int = 180) -> str:
    """Run ``script`` in a fresh Python process; returns stdout, fails the test on error."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, f"fresh process failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


# The loader must never unpickle: every unpickling entry point raises in the fresh process.
NO_PICKLE = """
import pickle, torch
def _forbidden(*a, **k):
    raise AssertionError("unpickling during load")
class _NoUnpickler(pickle.Unpickler):
    def load(self):
        raise AssertionError("unpickling during load")
pickle.load = pickle.loads = torch.load = _forbidden
pickle.Unpickler = _NoUnpickler
"""


def test_roundtrip_in_fresh_process_without_pickle(llama_artifact):
    path, _, ref = llama_artifact
    out = _run_fresh(textwrap.dedent("""
        import sys, torch, dbllm_compile
        from safetensors.torch import load_file
        from dbllm_compile.artifact import load_deployed
        ref = load_file(sys.argv[2])
        """) + NO_PICKLE + textwrap.dedent("""
        model = load_deployed(sys.argv[1])
        assert model.stage == "deploy" and len(model.report.rewritten) == 14
        assert torch.equal(model(ref["ids"]).logits, ref["logits"])
        print("same outputs")
    """), str(path), str(ref))
    assert "same outputs" in out


def test_manifest_records_format_source_and_layout(llama_artifact):
    path, deployed, _ = llama_artifact
    manifest, tensors = read_checkpoint(path)
    assert manifest["format_version"] == ARTIFACT_VERSION
    assert manifest["architecture"]["class"] == "LlamaForCausalLM"
    assert manifest["architecture"]["config"]["hidden_size"] == 64
    assert manifest["example_inputs"] == {"args": [{"shape": [2, 16], "dtype": "int64"}], "kwargs": {}}
    assert manifest["fixed_kwargs"] == {"use_cache": False}
    layer = manifest["layers"][0]
    assert tensors[layer["packed"]].dtype == torch.uint8
    assert list(tensors[layer["packed"]].shape) == [2, layer["out_features"], layer["padded_in_features"] // 8]
    assert tensors[layer["a1"]].dtype == torch.float16
    # non-persistent buffers (rotary inv_freq) are stored too: the skeleton has no values for them
    assert "model.rotary_emb.inv_freq" in tensors
    info = artifact_info(path)
    assert info.bits_per_weight == pytest.approx(2.5) and info.layers == 14
    assert info.bytes_on_disk == sum(p.stat().st_size for p in path.iterdir())


def test_gpt2_conv1d_roundtrip(tiny_gpt2, tmp_path):
    deployed = _deploy(tiny_gpt2, torch.randint(0, 100, (2, 16)))
    loaded = load_deployed(save_deployed(deployed, tmp_path / "gpt2"))
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(loaded(ids).logits, deployed(ids).logits)


def test_plain_module_needs_its_skeleton(mlp, tmp_path):
    x = torch.randn(4, 64)
    deployed = _deploy(mlp, x, keep_head=False)
    path = save_deployed(deployed, tmp_path / "mlp")
    with pytest.raises(ArtifactError, match=r"dbllm.json.*Sequential.*model=") as err:
        load_deployed(path)
    assert "not a Hugging Face model" in str(err.value)
    skeleton = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                                   torch.nn.GELU(), torch.nn.Linear(96, 10))  # other random weights
    loaded = load_deployed(path, model=skeleton)
    assert torch.equal(loaded(x), deployed(x))


def test_wrong_skeleton_is_a_clear_error(mlp, tmp_path):
    deployed = _deploy(mlp, torch.randn(4, 64), keep_head=False)
    path = save_deployed(deployed, tmp_path / "mlp")
    other = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    with pytest.raises(ArtifactError, match=r"layers differ from the stored ones"):
        load_deployed(path, model=other)


# ------------------------------------------------------------------ damaged files


@pytest.fixture
def artifact_copy(llama_artifact, tmp_path):
    import shutil

    path = tmp_path / "art"
    shutil.copytree(llama_artifact[0], path)
    return path


def test_corrupted_manifest(artifact_copy):
    (artifact_copy / MANIFEST_FILE).write_bytes(b"{\x00 not json")
    with pytest.raises(ArtifactError, match=r"dbllm\.json: corrupt manifest"):
        load_deployed(artifact_copy)


def test_truncated_weights(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS_FILE}: truncated: {len(data) // 2} of {len(data)} bytes"):
        load_deployed(artifact_copy)


def test_tampered_weights(artifact_copy):
    weights = artifact_copy / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # same size, one byte of tensor data changed
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS_FILE}: content does not match the sha256.*tampered"):
        load_deployed(artifact_copy)


def test_tampered_manifest(artifact_copy):
    path = artifact_copy / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["layers"][0]["out_features"] += 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"dbllm\.json: manifest checksum mismatch.*edited"):
        load_deployed(artifact_copy)


@pytest.mark.parametrize("version, message", [(ARTIFACT_VERSION + 1, "newer than this dbllm_compile reads"),
                                              (1, "too old to load")], ids=["newer", "older"])
def test_wrong_version(artifact_copy, version, message):
    path = artifact_copy / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["format_version"] = version
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=rf"dbllm\.json: format version {version}.*{message}"):
        load_deployed(artifact_copy)


def test_missing_files(artifact_copy, tmp_path):
    (artifact_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match=rf"{WEIGHTS_FILE}: missing"):
        load_deployed(artifact_copy)
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        load_deployed(tmp_path / "nowhere")


# ------------------------------------------------------------------ atomic save

KILL_DURING_SAVE = """
import os, signal, sys, torch, dbllm_compile
import safetensors.torch as st
from dbllm_compile.artifact import load_deployed, save_deployed
model = load_deployed(sys.argv[1])
def half_write_then_die(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\\0" * 1000)
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)      # killed mid-write: no cleanup code runs
st.save_file = half_write_then_die
save_deployed(model, sys.argv[2])
"""


@pytest.mark.parametrize("existing", [False, True], ids=["new", "over-old"])
def test_kill_during_save_leaves_old_artifact_or_none(llama_artifact, tmp_path, existing):
    import shutil

    dest = tmp_path / "dest"
    if existing:
        shutil.copytree(llama_artifact[0], dest)
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(llama_artifact[0]), str(dest)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if existing:
        read_checkpoint(dest)  # the old artifact, complete and verified
    else:
        assert not dest.exists()
    # the next save cleans up the dead writer's temporary directory
    save_deployed(llama_artifact[1], dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    read_checkpoint(dest)


def test_failed_save_leaves_nothing(llama_artifact, tmp_path, monkeypatch):
    import safetensors.torch as st

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        save_deployed(llama_artifact[1], tmp_path / "dest")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_training_model(mlp, tmp_path):
    q = dc.quantize(mlp, (torch.randn(4, 64),), progress=False)
    with pytest.raises(ArtifactError, match=r"convert\(\)"):
        save_deployed(q, tmp_path / "x")


# ------------------------------------------------------------------ trained layers into a fresh deploy


def test_apply_layers_moves_trained_layers_into_a_fresh_deploy_of_another_dtype(mlp, tmp_path):
    from dbllm_compile.artifact import apply_layers

    x = torch.randn(4, 64)
    student = dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False, init="maxabs"), progress=False)
    with torch.no_grad():  # "train" it: scales that no fresh initialisation reproduces
        for i, s in enumerate(student.scale_parameters()):
            s.mul_(1.0 + 0.1 * (i + 1))
    trained = dc.convert(student, progress=False)
    path = save_deployed(trained, tmp_path / "art")

    fresh = _deploy(mlp, x, keep_head=False, init="maxabs")
    assert not torch.equal(fresh(x), trained(x))
    assert len(apply_layers(fresh, path)) == 3
    assert torch.equal(fresh(x), trained(x))

    import copy

    mlp16 = copy.deepcopy(mlp).to(torch.bfloat16)  # same weights, another dtype
    fresh16 = _deploy(mlp16, x.bfloat16(), keep_head=False, init="maxabs")
    apply_layers(fresh16, path)
    torch.testing.assert_close(fresh16(x.bfloat16()).float(), trained(x), rtol=0.05, atol=0.05)


def test_apply_layers_errors_name_the_mismatch(mlp, tmp_path):
    from dbllm_compile.artifact import apply_layers

    x = torch.randn(4, 64)
    path = save_deployed(_deploy(mlp, x, keep_head=False, init="maxabs"), tmp_path / "art")
    with pytest.raises(ArtifactError, match="group_size 64.*group_size"):
        apply_layers(_deploy(mlp, x, keep_head=False, init="maxabs", group_size=32), path)
    with pytest.raises(ArtifactError, match="not dual-binary layers of the model"):
        apply_layers(_deploy(mlp, x, keep_head=False, init="maxabs", exclude=("0",)), path)
    with pytest.raises(ArtifactError, match="codebook"):
        apply_layers(_deploy(mlp, x, keep_head=False, init="maxabs", codebook="sign"), path)
    with pytest.raises(ArtifactError, match="not deployed"):
        apply_layers(dc.quantize(mlp, (x,), dc.DBLLMConfig(keep_head=False, init="maxabs"), progress=False), path)
