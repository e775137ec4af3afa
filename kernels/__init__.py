"""The Triton kernels (layer 0 of fastres; installed as fastres.kernels): @triton.jit code only,
one file per kernel family. Their host side is fastres.launch."""
