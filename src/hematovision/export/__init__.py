"""Preparing a trained run for serving: ONNX export, INT8 quantisation, review calibration."""
