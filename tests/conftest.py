"""Shared fixtures: tiny random-init models of the architectures the pass must handle."""

from __future__ import annotations

import os

import pytest
import torch

# `import dbllm_compile` imports Triton (to register the CUDA kernels). Without a GPU the kernel
# tests run in Triton's interpreter, which must be switched on before the first Triton import,
# i.e. here, before any test module imports dbllm_compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=64,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96), torch.nn.GELU(),
        torch.nn.Linear(96, 10),
    ).eval()




def _tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ~300) trained in memory on a few sentences."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sentences = [
        "the quick brown fox jumps over the lazy dog",
        "a tiny llama reads the quick brown book",
        "quantization to two bits keeps the model small",
    ] * 4
    backend = Tokenizer(tok_models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sentences, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A tiny random Llama (hidden 64, 2 layers) + tokenizer saved as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory, model, tokenizer


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache and zeroed ``backend="dbllm"`` counters before and after the test."""
    from dbllm_compile.backends.dynamo import reset_stats

    torch._dynamo.reset()
    reset_stats()
    yield
    torch._dynamo.reset()
