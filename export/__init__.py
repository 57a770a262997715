"""m2f.export: ONNX export with verified parity, TensorRT engines with m2f's kernels as plugins."""
