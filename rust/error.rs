//! Stable, machine-readable reasons an entry or a file is rejected. These codes are
//! written to the dead-letter stream's `reason` field: never rename one.
//!
//! This is the one registry of every code filepipe writes: the Python side reads it
//! (`_native.reason_codes()`) and refuses a dead letter with any other reason. Each
//! code is declared once, below; the enum, [`Reason::ALL`] and [`Reason::as_str`]
//! are generated from that one list, so they cannot disagree.

macro_rules! reasons {
    ($($(#[doc = $doc:literal])* $variant:ident => $code:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, in declaration order.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    /// The entry id is not `<ms>-<seq>`.
    BadEntryId => "bad_entry_id",
    /// More fields than FILEPIPE_MAX_ENTRY_FIELDS.
    TooManyFields => "too_many_fields",
    /// More bytes (id, field names and values) than FILEPIPE_MAX_ENTRY_BYTES.
    EntryTooLarge => "entry_too_large",
    MissingField => "missing_field",
    BadUuid => "bad_uuid",
    BadTimestamp => "bad_timestamp",
    BadSize => "bad_size",
    BadStorage => "bad_storage",
    BadContentType => "bad_content_type",
    NotUtf8 => "not_utf8",
    NulByte => "nul_byte",
    TooLong => "too_long",
    UnsafeKey => "unsafe_key",
    /// The file does not exist.
    Missing => "missing",
    NotAFile => "not_a_file",
    /// The file is larger than MAX_FILE_BYTES.
    TooLarge => "too_large",
    Unreadable => "unreadable",
    /// PostgreSQL refused the row while its neighbours loaded.
    DbRejected => "db_rejected",
    /// Delivered more than MAX_DELIVERIES times.
    MaxDeliveries => "max_deliveries",
    /// A bug: the parser panicked on this entry.
    Internal => "internal_error",
}

impl Reason {
    /// The reason with this code.
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == code)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for &r in Reason::ALL {
            let code = r.as_str();
            assert!(seen.insert(code), "{code} is declared twice");
            assert!(
                !code.is_empty()
                    && code
                        .bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_'),
                "{code} is not snake_case"
            );
            assert_eq!(Reason::from_code(code), Some(r));
        }
        assert_eq!(Reason::from_code("no_such_reason"), None);
    }
}
