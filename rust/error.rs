//! The one error type of the pure-Rust core. `bindings/` maps it to Python exceptions.

#[derive(Debug, thiserror::Error)]
pub enum EllmError {
    /// A bad argument: a shape that does not fit, a value out of range. Python: ValueError.
    #[error("{0}")]
    Value(String),
    /// A model file that is not what it claims (truncated, corrupt, an unsupported type).
    /// Python: ellm.ModelFormatError.
    #[error("{0}")]
    Format(String),
    /// A file that cannot be opened or mapped. Python: FileNotFoundError or OSError.
    #[error("{0}")]
    Io(String),
    /// A hook callback failed; the bindings keep the Python exception itself.
    #[error("a hook callback raised an exception")]
    Hook,
    /// More memory than can be had. Python: MemoryError.
    #[error("{0}")]
    Memory(String),
}

pub type Result<T> = std::result::Result<T, EllmError>;
