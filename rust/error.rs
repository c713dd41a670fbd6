//! Stable, machine-readable reasons an entry or a file is rejected. These codes are
//! written to the dead-letter stream's `reason` field: never rename one.

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    BadEntryId,
    MissingField,
    BadUuid,
    BadTimestamp,
    BadSize,
    BadStorage,
    BadContentType,
    NotUtf8,
    NulByte,
    TooLong,
    UnsafeKey,
    Missing,
    NotAFile,
    TooLarge,
    Unreadable,
    Internal,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Reason::BadEntryId,
        Reason::MissingField,
        Reason::BadUuid,
        Reason::BadTimestamp,
        Reason::BadSize,
        Reason::BadStorage,
        Reason::BadContentType,
        Reason::NotUtf8,
        Reason::NulByte,
        Reason::TooLong,
        Reason::UnsafeKey,
        Reason::Missing,
        Reason::NotAFile,
        Reason::TooLarge,
        Reason::Unreadable,
        Reason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadEntryId => "bad_entry_id",
            Reason::MissingField => "missing_field",
            Reason::BadUuid => "bad_uuid",
            Reason::BadTimestamp => "bad_timestamp",
            Reason::BadSize => "bad_size",
            Reason::BadStorage => "bad_storage",
            Reason::BadContentType => "bad_content_type",
            Reason::NotUtf8 => "not_utf8",
            Reason::NulByte => "nul_byte",
            Reason::TooLong => "too_long",
            Reason::UnsafeKey => "unsafe_key",
            Reason::Missing => "missing",
            Reason::NotAFile => "not_a_file",
            Reason::TooLarge => "too_large",
            Reason::Unreadable => "unreadable",
            Reason::Internal => "internal_error",
        }
    }
}

/// A file that could not be measured, with the reason to dead-letter it under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFailure {
    pub reason: Reason,
    pub message: String,
    /// A passing condition (out of descriptors, memory): retry the batch, do not dead-letter.
    pub transient: bool,
}

impl FileFailure {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        FileFailure {
            reason,
            message: message.into(),
            transient: false,
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        FileFailure {
            reason: Reason::Unreadable,
            message: message.into(),
            transient: true,
        }
    }
}
