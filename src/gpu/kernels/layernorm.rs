//! Launchers for kernels/layernorm.cu (not written yet).
