"""seg-accel: MMSegmentation-style semantic segmentation training on Hugging Face Accelerate."""

__version__ = "0.1.0"
