//! Why a run could not start.

/// A problem with what the user asked for, found before any load is sent.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// An input file, folder or address that cannot be used.
    #[error("{0}")]
    Input(String),
    /// The server to load answered the set-up questions wrongly or not at all.
    #[error("{0}")]
    Target(String),
}
