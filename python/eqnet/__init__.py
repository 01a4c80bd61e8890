"""eqnet: train one elastic quantization supernet, search it, deploy it from one file."""

__version__ = "0.1.0"
