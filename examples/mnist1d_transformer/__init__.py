"""MNIST-1D treated as a sequence: a small pre-LN transformer (LayerNorm slots)."""
