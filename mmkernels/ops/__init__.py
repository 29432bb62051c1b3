"""The ops: Triton kernels, launchers, torch.library registration and autograd, one file per op."""
