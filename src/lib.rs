//! mediaroute: a streaming reverse proxy that serves studio media from an S3 replica
//! region when a user's setting allows it, and from the primary otherwise.
//!
//! Modules point one way: `config` -> `table` -> (`route`, `probe`, `sign`, `health`, `upstream`) -> `proxy`
//! -> `server`; the binary (`main.rs`) sits on top.

#![warn(missing_docs)]

pub mod access;
pub mod access_line;
pub mod admin;
pub mod body;
pub mod client;
pub mod config;
pub mod demo;
pub mod duration;
pub mod error;
pub mod explain;
pub mod h1;
pub mod headers;
pub mod health;
pub mod idle;
pub mod log_writer;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod route;
pub mod server;
pub mod sign;
pub mod signals;
pub mod table;
pub mod throttle;
pub mod upstream;
