//! Pure-Rust compute kernels on row-major f32 slices. No PyO3 here: `cargo test` covers them.

pub mod activation;
pub mod aligned;
pub mod attention;
pub mod few_rows;
pub mod math;
pub mod matmul;
pub mod norm;
pub mod optical;
pub mod pool;
pub mod quant;
pub mod quantize;
pub mod rng;
pub mod rope;
pub mod sample;
pub mod simd;
pub mod softmax;
pub mod team;
