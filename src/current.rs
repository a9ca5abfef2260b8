//! [`Current`]: a value that a config reload swaps while readers keep the one they took.

use std::sync::{Arc, RwLock};

/// The current value of something replaced at run time (the config, the registry
/// client). `get` hands out the value as it is now; `set` affects later `get`s only.
pub struct Current<T>(RwLock<Arc<T>>);

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Current(RwLock::new(Arc::new(value)))
    }

    pub fn from_arc(value: Arc<T>) -> Self {
        Current(RwLock::new(value))
    }

    /// The value now.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the value.
    pub fn set(&self, value: Arc<T>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = value;
    }
}
