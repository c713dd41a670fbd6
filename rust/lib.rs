//! filepipe's hot path. The pure modules (`entry`, `copy`, `hash`, `time`,
//! `error`) know nothing about Python and are tested with `cargo test`;
//! `python` is the one PyO3 binding layer.

pub mod copy;
pub mod entry;
pub mod error;
pub mod hash;
pub mod time;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
