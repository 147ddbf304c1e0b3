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

        /// Map lookups by the id's text (a subject token, say).
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
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

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// What the grammar says, written independently of `check`.
        fn model(s: &str, extra: &[char]) -> Result<(), &'static str> {
            if s.is_empty() {
                Err("empty")
            } else if s.len() > MAX_ID_LEN {
                Err("too long")
            } else if s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || extra.contains(&c)) {
                Ok(())
            } else {
                Err("bad char")
            }
        }

        fn kind(e: &IdError) -> &'static str {
            match e {
                IdError::Empty(_) => "empty",
                IdError::TooLong(_) => "too long",
                IdError::BadChar(..) => "bad char",
            }
        }

        /// Mostly-valid strings with the characters that matter sprinkled in,
        /// around the 64-byte boundary, plus arbitrary unicode.
        fn candidates() -> impl Strategy<Value = String> {
            let near = proptest::collection::vec(
                prop_oneof![
                    8 => proptest::char::ranges(vec!['a'..='z', 'A'..='Z', '0'..='9'].into()),
                    2 => prop::sample::select(vec!['_', '-', '.', ':']),
                    1 => prop::sample::select(vec![
                        '*', '>', ' ', '\t', '\n', '\r', '\0', '/', 'é', '\u{a0}', '\u{3000}', '\u{feff}', '\u{1F600}',
                    ]),
                    1 => any::<char>(),
                ],
                0..80,
            )
            .prop_map(|cs| cs.into_iter().collect::<String>());
            prop_oneof![3 => near, 1 => any::<String>(), 1 => "\\PC{0,70}"]
        }

        /// Whatever an id type accepted: safe as a subject token (or, with
        /// `dots`, as a `Nats-Msg-Id`), bounded, and unchanged.
        fn assert_safe(s: &str, out: &str, display: String, dots: bool) -> Result<(), TestCaseError> {
            prop_assert_eq!(out, s);
            prop_assert_eq!(display.as_str(), s);
            prop_assert!((1..=MAX_ID_LEN).contains(&out.len()), "{:?}", out);
            for bad in ['*', '>', '\0'] {
                prop_assert!(!out.contains(bad), "{:?} has {:?}", out, bad);
            }
            prop_assert!(!out.chars().any(|c| c.is_whitespace() || c.is_control()), "{:?}", out);
            prop_assert!(out.is_ascii(), "{:?}", out);
            if !dots {
                prop_assert!(!out.contains('.') && !out.contains(':'), "{:?}", out);
            }
            Ok(())
        }

        macro_rules! check_type {
            ($ty:ty, $s:expr, $extra:expr, $dots:expr) => {{
                let s: &str = $s;
                let got = <$ty>::parse(s);
                prop_assert_eq!(got.as_ref().map(|_| ()).map_err(kind), model(s, $extra), "{:?}", s);
                // FromStr and JSON agree with parse.
                prop_assert_eq!(s.parse::<$ty>().ok(), got.clone().ok());
                let json = serde_json::to_string(s).unwrap();
                prop_assert_eq!(serde_json::from_str::<$ty>(&json).ok(), got.clone().ok());
                if let Ok(id) = got {
                    assert_safe(s, id.as_str(), id.to_string(), $dots)?;
                    // Round trip through JSON.
                    let back: $ty = serde_json::from_str(&serde_json::to_string(&id).unwrap()).unwrap();
                    prop_assert_eq!(back, id);
                }
            }};
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            #[test]
            fn parse_matches_the_grammar_and_never_panics(s in candidates()) {
                check_type!(RoomId, &s, &[], false);
                check_type!(UserId, &s, &[], false);
                check_type!(NodeId, &s, &[], false);
                check_type!(ClientMsgId, &s, &['.', ':'], true);
            }

            #[test]
            fn every_subject_safe_id_is_accepted(s in "[A-Za-z0-9_-]{1,64}") {
                prop_assert_eq!(RoomId::parse(&s).map(|id| id.to_string()), Ok(s.clone()));
                prop_assert_eq!(UserId::parse(&s).map(|id| id.to_string()), Ok(s.clone()));
                prop_assert_eq!(NodeId::parse(&s).map(|id| id.to_string()), Ok(s.clone()));
                prop_assert_eq!(ClientMsgId::parse(&s).map(|id| id.to_string()), Ok(s.clone()));
            }

            #[test]
            fn every_message_id_is_accepted(s in "[A-Za-z0-9_.:-]{1,64}") {
                prop_assert_eq!(ClientMsgId::parse(&s).map(|id| id.to_string()), Ok(s.clone()));
                let subject_safe = !s.contains('.') && !s.contains(':');
                prop_assert_eq!(RoomId::parse(&s).is_ok(), subject_safe);
            }

            #[test]
            fn one_byte_too_many_is_refused(s in "[A-Za-z0-9_-]{65,200}") {
                prop_assert!(matches!(RoomId::parse(&s), Err(IdError::TooLong(_))));
                prop_assert!(matches!(ClientMsgId::parse(&s), Err(IdError::TooLong(_))));
            }
        }
    }
}
