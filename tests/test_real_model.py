"""The pass on the bundled SmolLM2-135M: every decoder linear rewritten, the head kept, convert exact."""

from __future__ import annotations

import pytest
import torch

import dbllm_compile as dc
from dbllm_compile.models import DEFAULT_MODEL, load_model
from dbllm_compile.ops import DEPLOY_OP

pytestmark = pytest.mark.slow


def test_smollm2_all_210_decoder_linears_rewritten_head_kept():
    model, tokenizer = load_model(DEFAULT_MODEL)
    ids = tokenizer("The dual-binary model keeps the output head in full precision.", return_tensors="pt").input_ids
    q = dc.quantize(model, (torch.randint(0, 1000, (2, 16)),), example_kwargs={"use_cache": False}, progress=False)
    names = {r.name for r in q.report.rewritten}
    assert len(names) == 210
    for layer in range(30):
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            assert f"model.layers.{layer}.{proj}" in names
    assert [s.name for s in q.report.skipped] == ["lm_head"]
    d = dc.convert(q, progress=False)
    assert sum(n.target == DEPLOY_OP for n in d.graph_module.graph.nodes) == 210
    with torch.no_grad():
        assert torch.equal(q(ids).logits, d(ids).logits)  # dynamic sequence length, same bits
    assert d.size_report().bits_per_weight == pytest.approx(2.5)
