//! The hook points a step fires, by name, in firing order. Emit sites use these constants, never a
//! string of their own; Python's `ellm.hooks` holds the same names for the NumPy model, and
//! `_lowlevel.hook_points()` hands these to the test that keeps the two equal.

pub const EMBED_TOKENS: &str = "embed_tokens";
pub const FINAL_NORM: &str = "final_norm";
pub const LOGITS: &str = "logits";

/// Points outside the layers, in firing order.
pub const MODEL_POINTS: [&str; 3] = [EMBED_TOKENS, FINAL_NORM, LOGITS];

pub const INPUT_LAYERNORM: &str = "input_layernorm";
pub const Q_AFTER_PROJ: &str = "q_after_proj";
pub const K_AFTER_PROJ: &str = "k_after_proj";
pub const V_AFTER_PROJ: &str = "v_after_proj";
pub const Q_AFTER_ROPE: &str = "q_after_rope";
pub const K_AFTER_ROPE: &str = "k_after_rope";
pub const ATTENTION_CONTEXT: &str = "attention_context";
pub const ATTENTION_OUTPUT: &str = "attention_output";
pub const AFTER_ATTENTION_RESIDUAL: &str = "after_attention_residual";
pub const POST_ATTENTION_LAYERNORM: &str = "post_attention_layernorm";
pub const MLP_GATE_PROJ: &str = "mlp_gate_proj";
pub const MLP_UP_PROJ: &str = "mlp_up_proj";
pub const MLP_INTERMEDIATE: &str = "mlp_intermediate";
pub const MLP_OUTPUT: &str = "mlp_output";
pub const OUTPUT: &str = "output";

/// Each layer's points (fired as `layer{i}_{point}`), in firing order.
pub const LAYER_POINTS: [&str; 15] = [
    INPUT_LAYERNORM,
    Q_AFTER_PROJ,
    K_AFTER_PROJ,
    V_AFTER_PROJ,
    Q_AFTER_ROPE,
    K_AFTER_ROPE,
    ATTENTION_CONTEXT,
    ATTENTION_OUTPUT,
    AFTER_ATTENTION_RESIDUAL,
    POST_ATTENTION_LAYERNORM,
    MLP_GATE_PROJ,
    MLP_UP_PROJ,
    MLP_INTERMEDIATE,
    MLP_OUTPUT,
    OUTPUT,
];
