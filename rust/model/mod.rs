//! The Llama decoder in plain Rust: configuration, weight storage, KV cache, the step itself.

pub mod config;
pub mod hook_points;
pub mod kv_cache;
pub mod llama;
pub mod weights;

pub use config::LlamaConfig;
pub use llama::{Batch, Hooks, Input, Llama, LogitsWanted};
