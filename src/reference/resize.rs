//! Bicubic resize with PyTorch semantics (placeholder until implemented).
