//! Losses, optimisers, presets and the attack loop.
