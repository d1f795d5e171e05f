//! Launchers for kernels/update.cu (not written yet).
