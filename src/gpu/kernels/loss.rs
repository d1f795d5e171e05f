//! Launchers for kernels/loss.cu (not written yet).
