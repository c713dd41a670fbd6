//! filepipe's hot path, in the order data flows: `resp` reads Redis's replies in
//! place, `entry` validates one stream entry, `batch` carries a reply's entries
//! (copy or read in place, parse, one slot per record), `root` confines opens to the
//! storage root, `sniff` and `measure` measure files (`uring` opens and reads small ones a chunk at a time), `copy` encodes the rows, with `time` and `error` (the reason codes) beside them.
//! They know nothing about Python and are tested with `cargo test`; `python` is
//! the one PyO3 binding layer: it converts and releases the GIL.

pub mod batch;
pub mod copy;
pub mod entry;
pub mod error;
pub mod measure;
pub mod resp;
pub mod root;
pub mod sniff;
pub mod time;
pub mod uring;

#[cfg(feature = "python")]
mod python;

#[cfg(feature = "python")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
