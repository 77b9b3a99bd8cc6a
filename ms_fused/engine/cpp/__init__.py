"""The `cpp` backend: the fused CPU kernels of csrc/ (the extension ms_fused._C), called through torch ops."""
