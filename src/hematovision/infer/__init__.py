"""Inference, apart from training: the predictor, the runtime (PyTorch or ONNX), the review policy, Grad-CAM.

Nothing here imports :mod:`hematovision.train` or :mod:`hematovision.export`.
"""
