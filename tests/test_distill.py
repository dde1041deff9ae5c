"""Distillation: DAD-ED weights, loss decrease, block extraction, kill-and-resume."""

from __future__ import annotations

import dataclasses
import math
import weakref

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.distill import block_stage as block_mod
from dbllm_compile.distill import end_to_end as e2e_mod
from dbllm_compile.distill import step as step_mod
from dbllm_compile.distill.blocks import capture, extract_block
from dbllm_compile.distill.checkpoint import MetricsLog
from dbllm_compile.distill.losses import LossSpec, dad_weights, distill_loss
from dbllm_compile.distill.pipeline import distill
from dbllm_compile.distill.train import DistillConfig, trainable_parameters


def _llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _student(model, data):
    return dc.quantize(model, (data[:2],), example_kwargs={"use_cache": False}, progress=False)


def _data(n=8, t=16, seed=1):
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def test_dad_weights_follow_the_formula():
    torch.manual_seed(0)
    t, s = torch.randn(3, 7, 50) * 3, torch.randn(3, 7, 50) * 3
    ht = -(t.softmax(-1) * t.log_softmax(-1)).sum(-1) / math.log(50)
    hs = -(s.softmax(-1) * s.log_softmax(-1)).sum(-1) / math.log(50)
    for gamma in (0.5, 1.0, 2.0):
        a = (ht + (hs - ht).abs()) ** gamma
        torch.testing.assert_close(dad_weights(t, s, gamma=gamma), a / a.mean())
    mask = torch.ones(3, 7)
    mask[:, -2:] = 0
    w = dad_weights(t, s, mask=mask)
    assert torch.all(w[:, -2:] == 0) and float(w[mask.bool()].mean()) == pytest.approx(1.0)


def test_dad_loss_mixes_kl_and_reweighted_kl():
    torch.manual_seed(0)
    t, s = torch.randn(4, 9, 30), torch.randn(4, 9, 30, requires_grad=True)
    kl_tok = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)
    w = dad_weights(t, s)
    expected = (((1 - 0.3) + 0.3 * w) * kl_tok).mean()
    got = distill_loss(s, t, LossSpec("dad", lam=0.3))
    torch.testing.assert_close(got, expected)
    assert distill_loss(s, t, LossSpec("dad", lam=0.0)).item() == pytest.approx(distill_loss(s, t, LossSpec("kl")).item(), rel=1e-6)
    got.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    with pytest.raises(dc.ConfigError, match="kind"):
        LossSpec("mse")


def test_extracted_blocks_compose_to_the_model():
    model, data = _llama(), _data()
    q = _student(model, data)
    blocks = q.report.blocks
    assert [b.name for b in blocks] == ["model.layers.0", "model.layers.1"]
    ids = data[:2]
    names = {n for b in blocks for n in (*b.inputs, *b.outputs)}
    quantized = capture(q.graph_module, (ids,), q.fixed_kwargs, names, dense=False)
    for b in blocks:
        out = extract_block(q.graph_module, b)(*[quantized[n] for n in b.inputs])
        torch.testing.assert_close(out[0], quantized[b.outputs[0]], rtol=0, atol=0)
    # dense capture = the full-precision model
    dense = capture(q.graph_module, (ids,), q.fixed_kwargs, [blocks[0].outputs[0]], dense=True)
    hidden = model(ids, output_hidden_states=True, use_cache=False).hidden_states[1]  # after layer 0
    torch.testing.assert_close(dense[blocks[0].outputs[0]], hidden, rtol=1e-5, atol=1e-5)


def test_loss_decreases_in_a_few_steps(tmp_path):
    model, data = _llama(), _data(8, 16)
    q = _student(model, data)
    cfg = DistillConfig(steps=30, block_steps=15, batch_size=8, block_batch_size=8, lr=2e-3, latent_lr=2e-4,
                        block_lr=2e-3, warmup=0.0)
    result = distill(q, model, data, cfg, out_dir=tmp_path, progress=False)
    assert all(r["after"] < r["before"] for r in result.block_records)
    assert sum(result.losses[-5:]) < 0.8 * sum(result.losses[:5])
    for name in ("metrics.jsonl", "loss.png", "block_error.png", "dad_weights.png", "checkpoint.pt"):
        assert (tmp_path / name).is_file()


class _Killed(Exception):
    pass


@pytest.mark.parametrize("kill_at", ["blocks", "e2e"])
def test_kill_and_resume_gives_the_same_parameters(tmp_path, monkeypatch, kill_at):
    data = _data(8, 16)
    cfg = DistillConfig(steps=8, block_steps=4, batch_size=4, block_batch_size=4, checkpoint_every=3)

    def run(out, kill=False):
        model = _llama()
        q = _student(model, data)
        if kill:
            calls = {"n": 0}
            mod, target = (block_mod, "_rel_mse") if kill_at == "blocks" else (step_mod, "distill_loss")
            real = getattr(mod, target)
            limit = 8 + 4 if kill_at == "blocks" else 5  # mid-way through block 1 / at e2e step 5

            def dying(*a, **k):
                calls["n"] += 1
                if calls["n"] > limit:
                    raise _Killed
                return real(*a, **k)

            with monkeypatch.context() as m:
                m.setattr(mod, target, dying)
                with pytest.raises(_Killed):
                    distill(q, model, data, cfg, out_dir=out, progress=False, plots=False)
            model = _llama()
            q = _student(model, data)  # a fresh process: everything rebuilt from scratch
        distill(q, model, data, cfg, out_dir=out, progress=False, plots=False)
        scales, latents = trainable_parameters(q.graph_module, True)
        return {k: v.detach().clone() for k, v in {**scales, **latents}.items()}

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", kill=True)
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_block_losses_follow_their_formulas():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 8)
    ref[0, 0, 3] = 1e4  # a massive activation on one token
    out = ref + 0.1 * torch.randn(2, 5, 8)
    glob = block_mod._rel_mse((out,), (ref,))
    token = block_mod._token_rel_mse((out,), (ref,))
    assert torch.allclose(glob, ((out - ref) ** 2).sum() / (ref**2).sum())
    per_token = ((out - ref) ** 2).sum(-1) / (ref**2).sum(-1)
    assert torch.allclose(token, per_token.mean())
    # the massive token hides every other token's error from the global loss, not from the per-token one
    assert glob < 1e-6 < token
    channel = block_mod._channel_rel_mse((out,), (ref,))
    per_channel = ((out - ref) ** 2).sum((0, 1)) / (ref**2).sum((0, 1))
    assert torch.allclose(channel, per_channel.mean())
    assert glob < 1e-6 < channel  # the massive feature's scale does not hide the other features either
    with pytest.raises(dc.ConfigError, match="block_loss"):
        DistillConfig(block_loss="l1")


def test_w2a4_three_stages_train_what_each_stage_should(tmp_path):
    from dbllm_compile.distill import distill_w2a4
    from dbllm_compile.distill.train import activation_parameters

    model, data = _llama(), _data(8, 16)
    q = _student(model, data)
    snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def on_stage_end(name, student):
        snapshots[name] = {k: v.detach().clone() for k, v in student.graph_module.named_parameters()}

    weights = DistillConfig(steps=4, block_steps=2, batch_size=4, block_batch_size=4, lr=1e-3)
    acts = DistillConfig(steps=6, batch_size=4, activation_lr=5e-2)
    results = distill_w2a4(q, model, data, weights, acts, out_dir=tmp_path, progress=False, plots=False,
                           on_stage_end=on_stage_end)
    assert list(snapshots) == ["init", "weights", "activations-init", "activations"]
    assert q.config.activation_bits == 4 and len(q.report.activation_quantizers) == 8  # 2 layers x (qkv, o, gate/up, down)
    scale = next(iter(trainable_parameters(q.graph_module, False)[0]))
    assert not torch.equal(snapshots["init"][scale], snapshots["weights"][scale])      # stage 2 trains weights
    assert torch.equal(snapshots["activations-init"][scale], snapshots["activations"][scale])  # stage 3 does not
    clips = list(activation_parameters(q.graph_module))
    assert all(c not in snapshots["weights"] for c in clips)                            # inserted by stage 3
    assert any(not torch.equal(snapshots["activations-init"][c], snapshots["activations"][c]) for c in clips)
    assert len(results["activations"].losses) == 6 and results["activations"].block_records == []
    # a second call resumes: every stage restores its final parameters from its checkpoint
    q2 = _student(_llama(), data)
    distill_w2a4(q2, model, data, weights, acts, out_dir=tmp_path, progress=False, plots=False)
    for name, value in q.graph_module.named_parameters():
        assert torch.equal(value, dict(q2.graph_module.named_parameters())[name]), name


def test_w2a4_weights_stage_starts_from_a_finished_w2a16_run(tmp_path):
    from dbllm_compile.distill import distill, distill_w2a4
    from dbllm_compile.errors import DBLLMError

    model, data = _llama(), _data(8, 16)
    weights = DistillConfig(steps=3, block_steps=1, batch_size=4, block_batch_size=4, lr=1e-3)
    w2a16 = _student(model, data)
    # another learning rate than stage 2's config: ignoring weights_from would retrain to other weights
    first = distill(w2a16, model, data, dataclasses.replace(weights, lr=5e-3, latent_lr=5e-3),
                    out_dir=tmp_path / "w2a16", progress=False, plots=False)
    snapshot = {}

    def on_stage_end(name, student):
        if name == "weights":
            snapshot.update({k: v.detach().clone() for k, v in student.graph_module.named_parameters()})

    q = _student(_llama(), data)
    acts = DistillConfig(steps=2, batch_size=4)
    results = distill_w2a4(q, model, data, weights, acts, out_dir=tmp_path / "w2a4", progress=False, plots=False,
                           on_stage_end=on_stage_end, weights_from=tmp_path / "w2a16")
    assert (tmp_path / "w2a4" / "stage2-weights" / "checkpoint.pt").is_file()
    assert results["weights"].losses == first.losses and len(first.losses) == 3  # restored, not retrained
    for name, value in w2a16.graph_module.named_parameters():  # stage 2 = the W2A16 run's final weights
        assert torch.equal(value, snapshot[name]), name
    with pytest.raises(DBLLMError, match="needs out_dir"):
        distill_w2a4(_student(_llama(), data), model, data, weights, acts, weights_from=tmp_path / "w2a16")
    with pytest.raises(DBLLMError, match="no checkpoint"):
        distill_w2a4(_student(_llama(), data), model, data, weights, acts, out_dir=tmp_path / "other",
                     weights_from=tmp_path / "missing", progress=False)


def test_stage_that_trains_nothing_is_an_error():
    model, data = _llama(), _data(8, 16)
    q = _student(model, data)
    with pytest.raises(dc.ConfigError, match="trains nothing"):
        distill(q, model, data, DistillConfig(steps=1, block_steps=0, batch_size=4, train_weights=False),
                progress=False, plots=False)


def _block_params(q):
    scales, latents = trainable_parameters(q.graph_module, True)
    return {k: v.detach().clone() for k, v in {**scales, **latents}.items()}


def test_last_use_of_block_boundaries():
    data = _data(8, 16)
    blocks = _student(_llama(layers=3), data).report.blocks
    last = block_mod._last_use(blocks)
    assert set(last) == {n for b in blocks for n in (*b.inputs, *b.outputs)}
    shared = set.intersection(*(set(b.inputs) for b in blocks))  # rotary tables, mask, sizes
    assert {n for n in shared if not n.startswith("sym_size")} and all(last[n] == 2 for n in shared)
    for i, b in enumerate(blocks):
        (hidden,) = [n for n in b.inputs if n not in shared]
        assert last[hidden] == i  # read by this block only: the embedding, then the block before's output
        assert hidden == ("embedding" if i == 0 else blocks[i - 1].outputs[0])
        assert last[b.outputs[0]] == min(i + 1, 2)  # the next block's input; the last block's target


@pytest.mark.parametrize("resume", [False, True])
def test_block_stage_frees_values_after_their_last_use(tmp_path, monkeypatch, resume):
    """When block i trains, neither the teacher's values nor the quantized path's hold a value
    that no block from i on reads; at the end nothing is left. Also on the resume path, where
    the blocks before the checkpoint are replayed."""
    data = _data(8, 16)
    cfg = DistillConfig(block_steps=3, block_batch_size=4)
    ckpt = tmp_path / "checkpoint.pt"
    if resume:  # killed at block 2: the second call replays blocks 0 and 1
        real = block_mod._rel_mse
        calls = {"n": 0}

        def dying(*a, **k):
            calls["n"] += 1
            if calls["n"] > 2 * (3 + 2 * 2):  # two blocks of (3 steps + before/after on 2 batches)
                raise _Killed
            return real(*a, **k)

        with monkeypatch.context() as m:
            m.setattr(block_mod, "_rel_mse", dying)
            with pytest.raises(_Killed):
                block_mod.train_blocks(_student(_llama(layers=3), data), data, cfg, checkpoint=ckpt, progress=False)

    q = _student(_llama(layers=3), data)
    blocks = q.report.blocks
    last = block_mod._last_use(blocks)
    captured: list[dict] = []
    pushed: list[tuple[str, weakref.ref]] = []  # quantized-path values computed without gradient
    trained: list[int] = []
    current: dict[str, int] = {}
    real_capture, real_extract, real_loss = block_mod.capture, block_mod.extract_block, block_mod._rel_mse

    def spy_capture(*a, **k):
        captured.append(real_capture(*a, **k))
        return captured[-1]

    def spy_extract(gm, block):  # called once per block, at its start
        current["index"] = [b.name for b in blocks].index(block.name)
        module = real_extract(gm, block)

        def hook(_module, _args, out):
            if not torch.is_grad_enabled():
                pushed.extend((name, weakref.ref(value)) for name, value in zip(block.outputs, out))

        module.register_forward_hook(hook)
        return module

    def spy_loss(out, ref):
        i = current["index"]
        for values in captured:
            assert not [n for n in values if last[n] < i], f"block {i}: teacher values past their last use"
        assert not [n for n, r in pushed if r() is not None and last[n] < i], f"block {i}: chain values past their last use"
        trained.append(i)
        return real_loss(out, ref)

    monkeypatch.setattr(block_mod, "capture", spy_capture)
    monkeypatch.setattr(block_mod, "extract_block", spy_extract)
    monkeypatch.setattr(block_mod, "_rel_mse", spy_loss)
    records = block_mod.train_blocks(q, data, cfg, checkpoint=ckpt, progress=False)
    assert len(records) == 3 and sorted(set(trained)) == ([2] if resume else [0, 1, 2])
    assert captured and all(not values for values in captured)  # every teacher value freed
    assert pushed and all(r() is None for _, r in pushed)
    if resume:  # and the same parameters as an uninterrupted run
        straight = _student(_llama(layers=3), data)
        monkeypatch.undo()
        block_mod.train_blocks(straight, data, cfg, progress=False)
        resumed = _block_params(q)
        for k, v in _block_params(straight).items():
            assert torch.equal(v, resumed[k]), k


def test_block_offload_gives_the_same_parameters_and_is_reported(monkeypatch):
    data = _data(10, 16)  # 3 batches, the last one smaller
    moved = {"n": 0}
    real_to_host = block_mod._to_host

    def spy(*a, **k):
        moved["n"] += 1
        return real_to_host(*a, **k)

    monkeypatch.setattr(block_mod, "_to_host", spy)
    params, reports = {}, {}
    for offload in ("none", "cpu", "auto"):
        q = _student(_llama(), data)
        metrics = MetricsLog(None)
        moved["n"] = 0
        cfg = DistillConfig(block_steps=3, block_batch_size=4, block_offload=offload)
        records = block_mod.train_blocks(q, data, cfg, metrics=metrics, progress=False)
        params[offload] = (_block_params(q), [(r["before"], r["after"]) for r in records])
        (reports[offload],) = [r for r in metrics.records if "block_offload" in r]
        assert (moved["n"] > 0) == (offload == "cpu")
    for offload in ("cpu", "auto"):
        assert params[offload][1] == params["none"][1]
        for k, v in params["none"][0].items():
            assert torch.equal(v, params[offload][0][k]), (offload, k)
    assert [reports[o]["block_offload"] for o in ("none", "cpu", "auto")] == ["none", "cpu", "none"]  # auto: never on CPU
    assert reports["none"]["teacher_bytes"] == reports["cpu"]["teacher_bytes"] > 0
    with pytest.raises(dc.ConfigError, match="block_offload"):
        DistillConfig(block_offload="gpu")


def test_host_arena_stores_values_unchanged_in_shared_chunks():
    arena = block_mod._HostArena(pin=False)
    values = [torch.randn(3, 5), torch.randn(2, 7).to(torch.bfloat16), torch.arange(9), torch.rand(4) > 0.5,
              torch.tensor(2.5, dtype=torch.float64), torch.empty(0, 3)]
    stored = [arena.store(v) for v in values]
    for v, s in zip(values, stored):
        assert s.dtype == v.dtype and s.shape == v.shape and s.is_contiguous() and torch.equal(s, v)
        offset = s.data_ptr() - s.untyped_storage().data_ptr()
        assert offset % block_mod._HostArena.ALIGN == 0 or s.numel() == 0
    values[0].add_(1)
    assert not torch.equal(stored[0], values[0])  # copies, not views of the inputs
    arena = block_mod._HostArena(pin=False)  # values of one node: same size, carved out of shared chunks
    hidden = [arena.store(torch.full((3 << 10,), float(i))) for i in range(40)]  # 12 KiB each
    assert all(torch.equal(h, torch.full((3 << 10,), float(i))) for i, h in enumerate(hidden))
    ptrs = [h.untyped_storage().data_ptr() for h in hidden]
    sizes = {h.untyped_storage().nbytes() for h in hidden}
    assert sizes == {1 << 18}  # 16 x 12 KiB rounded up to a power of two: 21 values per chunk
    assert ptrs[:21] == [ptrs[0]] * 21 and ptrs[21:] == [ptrs[21]] * 19 and ptrs[21] != ptrs[0]
    cpu = torch.ones(2)
    assert block_mod._to_host(cpu) is cpu and block_mod._to_host(3) == 3  # nothing to move


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned host memory, asynchronous copies)")
def test_block_offload_on_cuda_gives_the_same_parameters():
    """The CUDA path of the offload: captures pinned in host arenas, copied back non-blocking."""
    data = _data(10, 16)
    params = {}
    for offload in ("none", "cpu"):
        q = _student(_llama().cuda(), data.cuda())
        metrics = MetricsLog(None)
        cfg = DistillConfig(block_steps=3, block_batch_size=4, block_offload=offload)
        records = block_mod.train_blocks(q, data, cfg, metrics=metrics, progress=False)
        (report,) = [r for r in metrics.records if "block_offload" in r]
        assert report["block_offload"] == offload and report["free_bytes"] > 0
        params[offload] = (_block_params(q), [(r["before"], r["after"]) for r in records])
    assert params["cpu"][1] == params["none"][1]
    for k, v in params["none"][0].items():
        assert torch.equal(v, params["cpu"][0][k]), k


def test_checkpoint_seconds_throttles_end_to_end_checkpoints(tmp_path, monkeypatch):
    """checkpoint_every=1 with a long minimum interval writes only the last step's checkpoint."""
    model, data = _llama(), _data(8, 16)
    saved = []
    real = e2e_mod.save_checkpoint
    monkeypatch.setattr(e2e_mod, "save_checkpoint", lambda path, state: (saved.append(state["step"] if state["stage"] == "e2e" else None), real(path, state)))
    for seconds, expected in ((0.0, [1, 2, 3, 4]), (3600.0, [4])):
        saved.clear()
        cfg = DistillConfig(steps=4, block_steps=0, batch_size=4, checkpoint_every=1, checkpoint_seconds=seconds)
        distill(_student(model, data), model, data, cfg, out_dir=tmp_path / str(seconds), progress=False, plots=False)
        assert [s for s in saved if s is not None] == expected
    with pytest.raises(dc.ConfigError, match="checkpoint_seconds"):
        DistillConfig(checkpoint_seconds=-1.0)


def test_profile_steps_logs_the_top_ops(tmp_path):
    import json

    model, data = _llama(), _data(8, 16)
    cfg = DistillConfig(steps=23, block_steps=0, batch_size=4, profile_steps=2)
    distill(_student(model, data), model, data, cfg, out_dir=tmp_path, progress=False, plots=False)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    prof = [r for r in recs if r.get("stage") == "e2e_profile"]
    assert len(prof) == 1 and prof[0]["first_step"] == 20 and prof[0]["steps"] == 2
    top = prof[0]["top"]  # on CPU: ops by self CPU time, most expensive first ("(all kernels)" only on CUDA)
    assert 5 < len(top) <= 30 and not any(r["name"].startswith("(all") for r in top)
    assert any("mm" in r["name"] for r in top)
    times = [r["us_per_step"] for r in top]
    assert times == sorted(times, reverse=True) and times[0] > 0
