"""Calibration sets, INT8 explicit Q/DQ quantization and TensorRT compatibility checks."""
