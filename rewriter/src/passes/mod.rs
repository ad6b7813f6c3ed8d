//! Rewriting passes. One pass per module; each has its tests beside it.

pub mod fused_loss;
