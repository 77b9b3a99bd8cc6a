"""The `torch` backend: chunked PyTorch operations, on any device PyTorch runs on."""
