//! Launchers for kernels/activation.cu (not written yet).
