"""What makes each loss: the Multi-Similarity loss (ms_*) and the pair-weighting family SupCon / NT-Xent / Circle
(pair_*), each with its public functions and modules and its plain-PyTorch reference."""
