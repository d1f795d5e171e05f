//! Launchers for kernels/resize.cu (not written yet).
