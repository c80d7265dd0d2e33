"""
What a training run will cost, worked out before it runs: floating-point operations per token and the
GPU's peak, which give the MFU that train.py reports.

    n_params, flops_per_token, peak = flops(model, mcfg, seq_len, device)
"""

import torch

# dense bf16 peak of each GPU (datasheet, without sparsity), found by a substring of its name
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


def flops(model, mcfg, seq_len, device):
    """(parameters, flops per token, the GPU's peak bf16 flops or None): 6 flops per weight per token for
    the matmuls of forward and backward (the embedding lookup is not one), plus attention; recomputation
    is not counted (PaLM's convention)."""
    n_params = sum(p.numel() for p in model.parameters())  # DTensors count their full size
    n_matmul = n_params - (0 if mcfg.tie_word_embeddings else mcfg.vocab_size * mcfg.hidden_size)
    per_token = 6 * n_matmul + 12 * mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim * seq_len
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    return n_params, per_token, peak
