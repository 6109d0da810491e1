"""Evaluation: PSNR/SSIM on Y (MATLAB conventions) and the benchmark protocol."""
