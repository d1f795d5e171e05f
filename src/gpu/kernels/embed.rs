//! Launchers for kernels/embed.cu (not written yet).
