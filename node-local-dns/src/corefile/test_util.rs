//! Helpers the unit tests of the Corefile passes share: parse a Corefile text with an empty
//! environment, expect one block, or expect an error.

use std::path::Path;

use super::{parse_with_env, CorefileError};
use crate::config::{Config, ServerBlock};

pub(super) fn parse_str(text: &str) -> Result<Config, CorefileError> {
    parse_with_env(text, Path::new("Corefile"), &|_| None)
}

pub(super) fn one(text: &str) -> ServerBlock {
    let mut config = parse_str(text).unwrap();
    assert_eq!(config.blocks.len(), 1);
    config.blocks.remove(0)
}

pub(super) fn err(text: &str) -> String {
    parse_str(text).unwrap_err().to_string()
}
