"""The fused computations as torch.library custom ops (layer 2): fastres::conv_bn_act (eval,
BN folded) and fastres::block_train (train mode, batch statistics), with fake implementations
for torch.compile, autograd formulas, torch fallbacks for where the kernels do not run, and the
validation of their arguments. Built on fastres.launch; fastres.nn builds on it."""
