"""The pure-PyTorch training core: optimisation, precision, the step, checkpoint I/O."""
