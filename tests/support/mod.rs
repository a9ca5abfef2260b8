//! Shared integration-test support: a real `docker-registry` child process
//! ([`registry`]) and in-memory image building and pushing ([`oci`]).
//!
//! Use from an integration test with `mod support;`. Each test binary uses
//! only part of this code, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod daemon;
pub mod db_server;
pub mod fault_proxy;
pub mod http1;
pub mod oci;
pub mod registry;
pub mod reliability;
pub mod scripted_http;
