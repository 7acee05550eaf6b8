"""dwk: analysis of trained depthwise convolution kernels."""
__version__ = "0.1.0"
