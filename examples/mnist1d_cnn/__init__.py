"""MNIST-1D example: a 1-D CNN LightningModule and a DataModule with data generated offline."""
