import torch

# The models in the tests are tiny: one thread is faster than two fighting over 2 cores.
torch.set_num_threads(1)
