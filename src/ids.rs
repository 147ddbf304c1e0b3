//! Identifiers that travel into NATS subjects, headers and SQL.
//!
//! Room and user ids become subject tokens (`chat.room.<room>.msg`), so a `.`,
//! `*` or `>` in one would be subject injection; they are parsed here, once, and
//! only the parsed types reach `bus::subjects`.

use std::fmt;

/// Longest id accepted anywhere.
pub const MAX_ID_LEN: usize = 64;

/// Why an id was refused; the text is safe to echo to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} is longer than 64 characters")]
    TooLong(&'static str),
    #[error("{0} may contain only {1}")]
    BadChar(&'static str, &'static str),
}

fn check(what: &'static str, s: &str, extra: &[u8], allowed: &'static str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty(what));
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong(what));
    }
    let ok = s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || extra.contains(&b));
    if ok { Ok(()) } else { Err(IdError::BadChar(what, allowed)) }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $extra:expr, $allowed:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Accepts `s` only if it matches the id grammar.
            pub fn parse(s: &str) -> Result<Self, IdError> {
                check($what, s, $extra, $allowed).map(|()| Self(s.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                Self::parse(s)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::parse(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A room id: `[A-Za-z0-9_-]{1,64}`; safe as a subject token.
    RoomId, "room id", &[], "A-Z a-z 0-9 _ -"
);
id_type!(
    /// A user id (the JWT `sub`): `[A-Za-z0-9_-]{1,64}`; safe as a subject token.
    UserId, "user id", &[], "A-Z a-z 0-9 _ -"
);
id_type!(
    /// A gateway's node id in presence keys and logs: `[A-Za-z0-9_-]{1,64}`.
    NodeId, "node id", &[], "A-Z a-z 0-9 _ -"
);
id_type!(
    /// A client's message id, used for dedupe in `Nats-Msg-Id` (never in a subject):
    /// `[A-Za-z0-9_.:-]{1,64}`.
    ClientMsgId, "message id", b".:", "A-Z a-z 0-9 _ - . :"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_grammar() {
        for ok in ["general", "a", "A-b_9", &"x".repeat(64)] {
            assert!(RoomId::parse(ok).is_ok(), "{ok}");
            assert!(UserId::parse(ok).is_ok(), "{ok}");
        }
        assert!(ClientMsgId::parse("01J:abc.def-1").is_ok());
    }

    #[test]
    fn rejects_subject_injection_and_junk() {
        let long = "x".repeat(65);
        for bad in ["", "a.b", "*", ">", "a b", "a\0b", "é", "a/b", "a:b", long.as_str()] {
            assert!(RoomId::parse(bad).is_err(), "{bad:?} must be refused");
            assert!(UserId::parse(bad).is_err(), "{bad:?} must be refused");
        }
        for bad in ["", "a b", "a*", "a>", "a\nb", long.as_str()] {
            assert!(ClientMsgId::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn deserialize_validates() {
        assert!(serde_json::from_str::<RoomId>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<RoomId>("\"a.>\"").is_err());
    }
}
