//! Readers of model files.

pub mod gguf;
