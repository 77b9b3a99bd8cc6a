"""What every loss runs on: input checks, the backend registry, the fused backward's glue and saved statistics,
and one folder per backend (cpp/, torch/, triton/) with its kernels."""
