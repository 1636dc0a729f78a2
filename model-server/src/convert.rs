//! Readers of the upstream checkpoint formats, used offline to build the model repository.

pub mod darknet;
pub mod pth;
