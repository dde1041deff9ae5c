"""Quick start: quantize a model's linears to dual-binary 2-bit, fine-tune the scales, pack, run.

    python examples/quickstart.py

Runs in seconds on a CPU with a small random-init Llama (no download needed).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import dbllm_compile as dc

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).eval()
ids = torch.randint(0, 256, (2, 32))

# 1. Trace with torch.export and rewrite every decoder linear into the trainable dual-binary op.
config = dc.DBLLMConfig(group_size=64)  # head and embeddings stay in full precision
qmodel = dc.quantize(model, (ids,), config, example_kwargs={"use_cache": False})
print(qmodel.report.summary())

# 2. The scales (and, through the straight-through estimator, the latent weights) are parameters:
#    a few steps of distillation against the full-precision model.
opt = torch.optim.AdamW(list(qmodel.scale_parameters()), lr=1e-3)
with torch.no_grad():
    teacher = model(ids, use_cache=False).logits.log_softmax(-1)
for step in range(5):
    student = qmodel(ids).logits.log_softmax(-1)
    loss = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: KL {loss.item():.4f}")

# 3. Pack the bits: 2 bits per weight plus two fp16 scales per group of 64 = 2.5 bits.
deployed = dc.convert(qmodel)
with torch.no_grad():
    assert torch.equal(qmodel(ids).logits, deployed(ids).logits)  # same bits, same scales
print(deployed.size_report())
