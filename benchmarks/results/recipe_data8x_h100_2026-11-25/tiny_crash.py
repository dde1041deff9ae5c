"""Reproduce the Triton crash of the tiny Llama's compiled distillation step on CUDA (results.md 3.0h)."""
import sys, tempfile, torch
sys.path.insert(0, ".")
from tests.conftest import _tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from dbllm_compile.cli import main

tok = _tiny_tokenizer()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
d = tempfile.mkdtemp()
LlamaForCausalLM(cfg).eval().save_pretrained(d)
tok.save_pretrained(d)
rc = main(["quantize", "--model", d, "--no-default-text", "--out", d + "/o", "--steps", "2", "--block-steps", "1",
           "--tokens", "256", "--calib-seq-len", "32", "--gen-batch-size", "4", "--device", "cuda"] + sys.argv[1:])
print("RC", rc)
