"""scikit-learn's 8x8 digits images with a small 2-D CNN (BatchNorm2d slots)."""
