"""What a run will cost: the datasheet's dense bf16 peak of each GPU, which train.py and bench/bench.py use."""

# FLOP/s, dense (no sparsity); a key matches when it is part of torch.cuda.get_device_name()
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
