//! The Redis store: shared state for many instances.

use super::{Change, Fetched, Store, StoreError};
use crate::timestamp::Micros;

/// Update times in Redis.
pub struct RedisStore {
    url: String,
}

impl RedisStore {
    /// Connects lazily to `url`.
    pub fn new(url: &str, _changelog_maxlen: u64) -> Result<RedisStore, StoreError> {
        Ok(RedisStore {
            url: url.to_owned(),
        })
    }
}

impl Store for RedisStore {
    fn describe(&self) -> String {
        format!("Redis at {}", crate::config::redact_url(&self.url))
    }
    fn fetch(&mut self) -> Result<Fetched, StoreError> {
        Err(StoreError("not implemented".into()))
    }
    fn write(&mut self, _batch: &[Change]) -> Result<Vec<Micros>, StoreError> {
        Err(StoreError("not implemented".into()))
    }
}
