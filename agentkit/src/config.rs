//! Config loading: YAML → serde structs (`deny_unknown_fields` is the agents' job) with errors
//! that name the field path, like `routes[2].backends[0]: invalid socket address`.
//!
//! Each agent deserializes into its own raw types with [`load`] or [`parse`], then validates them
//! into a runtime type, reporting semantic problems with [`ConfigError::invalid`].

use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config that could not be read, parsed or validated. The message always names the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The YAML does not fit the schema (syntax, unknown field, wrong type).
    #[error("{field}: {message}")]
    Parse {
        /// Dotted path of the field, `.` for the document itself.
        field: String,
        /// What serde said.
        message: String,
    },
    /// The values parse but make no sense together.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

impl ConfigError {
    /// A validation error for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The field the error is about, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Parse { field, .. } | ConfigError::Invalid { field, .. } => Some(field),
        }
    }
}

/// Reads and deserializes a YAML file.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(&text)
}

/// Deserializes YAML text, naming the field on error.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let field = err.path().to_string();
        let inner = err.into_inner().to_string();
        // serde_yaml appends " at line L column C"; keep it, it helps.
        ConfigError::Parse {
            field,
            message: inner,
        }
    })
}

/// Parses a duration written like `250ms`, `10s`, `5m`, `24h` or `0`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` has no unit (ms, s, m, h)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 10s"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (ms, s, m, h)")),
    };
    n.checked_mul(scale)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("`{text}` is too long"))
}

/// `#[serde(with = "agentkit::config::duration")]` for `Duration` fields written as `10s`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Deserializes `10s`-style text.
    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(de)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }

    /// Serializes as milliseconds, `250ms`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", d.as_millis()))
    }
}

/// `#[serde(default, with = "agentkit::config::opt_duration")]` for `Option<Duration>` fields.
pub mod opt_duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Deserializes optional `10s`-style text.
    pub fn deserialize<'de, D: Deserializer<'de>>(de: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(de)? {
            None => Ok(None),
            Some(text) => super::parse_duration(&text)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }

    /// Serializes as milliseconds.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format!("{}ms", d.as_millis())),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Doc {
        #[allow(dead_code)]
        items: Vec<Item>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        #[allow(dead_code)]
        #[serde(with = "duration")]
        wait: Duration,
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10d").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("99999999999999999h").is_err());
    }

    #[test]
    fn parse_errors_name_the_field() {
        let err = parse::<Doc>("items:\n  - wait: 1s\n  - wait: soon\n").unwrap_err();
        assert_eq!(err.field(), Some("items[1].wait"), "{err}");
        let err = parse::<Doc>("items:\n  - wait: 1s\n    extra: 1\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `extra`"), "{err}");
    }

    #[test]
    fn read_errors_name_the_file() {
        let err = load::<Doc>(Path::new("/nonexistent/agent.yaml")).unwrap_err();
        assert!(
            err.to_string().starts_with("/nonexistent/agent.yaml"),
            "{err}"
        );
    }
}
