//! Configuration values checked when they are parsed (numbers in a range, texts that are not
//! empty), so that a bad value is a parse error naming the key and code that reads it needs no
//! second check.

use serde::{Deserialize, Deserializer};
use std::fmt;
use std::marker::PhantomData;

/// A `u64` in `MIN..=MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bounded<const MIN: u64, const MAX: u64>(u64);

impl<const MIN: u64, const MAX: u64> Bounded<MIN, MAX> {
    /// `value`, if it is in range.
    pub const fn new(value: u64) -> Option<Self> {
        if value >= MIN && value <= MAX {
            Some(Bounded(value))
        } else {
            None
        }
    }

    /// A constant known to be in range (a default); out of range fails to compile when used
    /// in a `const`.
    pub const fn of(value: u64) -> Self {
        match Self::new(value) {
            Some(bounded) => bounded,
            None => panic!("constant out of range"),
        }
    }

    /// The value.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl<const MIN: u64, const MAX: u64> fmt::Display for Bounded<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u64::deserialize(deserializer)?;
        Bounded::new(value).ok_or_else(|| {
            serde::de::Error::custom(format!("must be between {MIN} and {MAX}, got {value}"))
        })
    }
}

/// A string that is not empty.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NonEmpty(String);

impl NonEmpty {
    /// `text`, if it is not empty.
    pub fn new(text: impl Into<String>) -> Option<NonEmpty> {
        let text = text.into();
        (!text.is_empty()).then_some(NonEmpty(text))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for NonEmpty {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NonEmpty {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() {
            return Err(serde::de::Error::custom("must not be empty"));
        }
        Ok(NonEmpty(text))
    }
}

/// What a [`Checked`] text must be.
pub trait TextRule {
    /// Why `text` is refused, or `None` when it passes.
    fn refuse(text: &str) -> Option<String>;
}

/// A text that passed the rule `R` when the configuration was read (a queue URL, a route, a
/// stream name): one type per rule, one `Deserialize` for them all.
pub struct Checked<R>(String, PhantomData<fn() -> R>);

impl<R: TextRule> Checked<R> {
    /// `text`, if it passes the rule; else why not.
    ///
    /// # Errors
    ///
    /// The rule's reason.
    pub fn new(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        match R::refuse(&text) {
            Some(reason) => Err(reason),
            None => Ok(Checked(text, PhantomData)),
        }
    }
}

impl<R> Checked<R> {
    /// A constant that passes the rule (a default), taken as it is.
    #[cfg_attr(
        not(feature = "nats"),
        expect(dead_code, reason = "only the NATS source has such a default")
    )]
    pub(crate) fn known(text: &str) -> Self {
        Checked(text.to_owned(), PhantomData)
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<R> Clone for Checked<R> {
    fn clone(&self) -> Self {
        Checked(self.0.clone(), PhantomData)
    }
}

impl<R> fmt::Debug for Checked<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<R> fmt::Display for Checked<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<R> std::ops::Deref for Checked<R> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de, R: TextRule> Deserialize<'de> for Checked<R> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Checked::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct Sample {
        n: Bounded<1, 10>,
    }

    #[test]
    fn values_out_of_range_are_refused_with_the_range() {
        assert_eq!(toml::from_str::<Sample>("n = 10").unwrap().n.get(), 10);
        let error = toml::from_str::<Sample>("n = 11").unwrap_err().to_string();
        assert!(error.contains("between 1 and 10, got 11"), "{error}");
        assert!(toml::from_str::<Sample>("n = -1").is_err());
    }

    struct Lower;
    impl TextRule for Lower {
        fn refuse(text: &str) -> Option<String> {
            (text.chars().any(char::is_uppercase))
                .then(|| format!("must be lower case, got {text:?}"))
        }
    }

    #[derive(Deserialize)]
    struct Named {
        name: Checked<Lower>,
    }

    #[test]
    fn checked_texts_are_refused_with_the_rules_reason() {
        assert_eq!(
            toml::from_str::<Named>("name = \"ok\"")
                .unwrap()
                .name
                .as_str(),
            "ok"
        );
        let error = toml::from_str::<Named>("name = \"Bad\"")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("must be lower case, got \"Bad\""), "{error}");
    }
}
