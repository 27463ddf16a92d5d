//! # broker-node: the `broker` binary's library
//!
//! The one crate that names engines and transports ([`wiring`], behind cargo features), the
//! scripted demo and the local development cluster ([`demo`], on `consensus-harness`), the admin
//! CLI ([`cli`]) and the HTTP client it uses ([`http`]). The metadata plane itself is the `broker` crate,
//! which depends only on `consensus-api`.

#![warn(missing_docs, unreachable_pub)]

pub mod cli;
pub mod config_file;
pub mod demo;
pub mod dump;
pub mod http;
pub mod wiring;
