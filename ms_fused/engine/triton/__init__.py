"""The `triton` backend: fused GPU kernels written in Triton (on the CPU only under TRITON_INTERPRET=1)."""
