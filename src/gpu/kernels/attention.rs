//! Launchers for kernels/attention.cu (not written yet).
