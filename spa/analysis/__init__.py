"""Analyses over an onnx_ir model: channel couplings, groups, FLOPs/params. None mutates the model."""
