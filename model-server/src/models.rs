//! The network architectures the server runs, one module each, behind the backend seam.

pub mod efficientnet;
pub mod yolo;
