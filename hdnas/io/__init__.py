"""Files in and out: atomic writes, run checkpoints, safetensors weights, the official DLSR
checkpoints, image files, upscaling image files, exports (safetensors, ONNX, torch.export)."""
