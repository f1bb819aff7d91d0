//! Service names as the registry accepts them.

use std::fmt;

/// Longest service name (a DNS label, so names can become hostnames in Kubernetes).
pub const MAX_NAME_LEN: usize = 63;

/// A service name: lowercase `[a-z0-9-]`, 1 to 63 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName(String);

/// Why a string is not a [`ServiceName`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidName {
    /// The empty string.
    #[error("name must not be empty")]
    Empty,
    /// More than [`MAX_NAME_LEN`] characters.
    #[error("name is {0} characters long; at most 63 are allowed")]
    TooLong(usize),
    /// A character outside `[a-z0-9-]`.
    #[error("name contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    BadChar(char),
}

impl ServiceName {
    /// Checks `name` against the registry's rules.
    pub fn parse(name: &str) -> Result<Self, InvalidName> {
        if name.is_empty() {
            return Err(InvalidName::Empty);
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
        {
            return Err(InvalidName::BadChar(bad));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(InvalidName::TooLong(name.len()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> Self {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_system_names() {
        for n in [
            "user-service",
            "order-service",
            "api-gateway",
            "a",
            "x1-2",
            &"a".repeat(63),
        ] {
            assert_eq!(ServiceName::parse(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn rejects_bad_names_precisely() {
        assert_eq!(ServiceName::parse(""), Err(InvalidName::Empty));
        assert_eq!(
            ServiceName::parse(&"a".repeat(64)),
            Err(InvalidName::TooLong(64))
        );
        assert_eq!(ServiceName::parse("User"), Err(InvalidName::BadChar('U')));
        assert_eq!(ServiceName::parse("a_b"), Err(InvalidName::BadChar('_')));
        assert_eq!(ServiceName::parse("a/b"), Err(InvalidName::BadChar('/')));
        assert_eq!(ServiceName::parse("é"), Err(InvalidName::BadChar('é')));
    }
}
